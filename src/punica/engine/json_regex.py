"""Regular expressions as byte automata: JSON schema's `pattern` over a JSON string's content (its quotes
excluded), and SamplingParams.regex / .choice over a whole output's UTF-8 (`raw`).

A pattern is read as ECMA-262 regular expressions read it (JSON Schema's dialect), for the regular part of that
language: literals, `.`, classes (`[a-z]`, `[^"]`, `\\d \\w \\s` and their negations), groups (`(...)`, `(?:...)`,
`(?<name>...)`), alternation, the quantifiers `* + ? {n} {n,} {n,m}` (lazy ones too: they match the same strings)
and the anchors `^` / `$` at the start and end of a top-level alternative. A pattern matches a string when it
matches somewhere in it, so an unanchored side may be followed (preceded) by anything. Backreferences,
lookarounds, word boundaries and anchors elsewhere are refused with an error that names them.

The automaton runs over the string as the model writes it inside JSON: characters as UTF-8, except `"`, `\\`
and control characters, which must be escaped (as `\\"`, `\\\\`, `\\n`, `\\t`, `\\r`, `\\b`, `\\f`, or `\\u00xx` in
lower case). Each character has that one spelling, so the written string matches the pattern once decoded, and
every state knows whether a character's spelling is under way (DFA.boundary): length limits are counted beside it.
A raw output is its characters' UTF-8, and the whole of it must match (as vLLM's guided_regex).
"""

from __future__ import annotations

import collections
import math
from decimal import Decimal
from typing import NamedTuple

from punica.errors import BadRequestError

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
MAX_NFA_STATES = 50_000  # a pattern's counted repetitions expand: bound what they may cost
MAX_DFA_STATES = 5_000

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code point ranges

ANY: Ranges = ((0, MAX_CODE_POINT),)
DIGIT: Ranges = ((0x30, 0x39),)
WORD: Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE: Ranges = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
                 (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
LINE_TERMINATORS: Ranges = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))
CLASS_ESCAPES = {"d": (DIGIT, False), "D": (DIGIT, True), "w": (WORD, False), "W": (WORD, True),
                 "s": (SPACE, False), "S": (SPACE, True)}
CONTROL_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}
JSON_SHORT_ESCAPES = {0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0C: b"\\f", 0x0D: b"\\r", 0x22: b'\\"',
                      0x5C: b"\\\\"}


def normalize(ranges) -> Ranges:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def negate(ranges: Ranges) -> Ranges:
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODE_POINT:
        out.append((nxt, MAX_CODE_POINT))
    return tuple(out)


# ---- Parsing: pattern -> tree ---------------------------------------------------------------------------------
# ("set", ranges) | ("cat", [trees]) | ("alt", [trees]) | ("rep", tree, lo, hi or None) | ("bol",) | ("eol",)

class _Parser:
    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0

    def error(self, what: str) -> BadRequestError:
        return BadRequestError(f"pattern {self.p!r}: {what} (at offset {self.i})")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        if self.i >= len(self.p):
            raise self.error("ends too soon")
        self.i += 1
        return self.p[self.i - 1]

    def parse(self):
        tree = self.alternation()
        if self.i < len(self.p):
            raise self.error(f"unbalanced {self.p[self.i]!r}")
        return tree

    def alternation(self):
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            atom = self.atom()
            if atom[0] in ("bol", "eol"):
                if self.peek() in ("*", "+", "?", "{") and self.quantifier() is not None:
                    raise self.error("a quantifier on an anchor")
                items.append(atom)
                continue
            q = self.quantifier()
            items.append(atom if q is None else ("rep", atom, *q))
        return ("cat", items)

    def quantifier(self) -> tuple[int, int | None] | None:
        """(lo, hi or None) of the quantifier here, read; None where there is none."""
        q = self.bounds()
        if q is None:
            return None
        if self.peek() == "?":  # lazy: the same strings match
            self.i += 1
        if self.bounds(peek=True) is not None:
            raise self.error("a quantifier after a quantifier")
        return q

    def bounds(self, peek: bool = False) -> tuple[int, int | None] | None:
        c = self.peek()
        if c in ("*", "+", "?"):
            end, q = self.i + 1, {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            close = self.p.find("}", self.i)
            body = self.p[self.i + 1:close] if close > 0 else ""
            lo, comma, hi = body.partition(",")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                return None  # a literal "{", as ECMA's web-compatible grammar reads it
            end, q = close + 1, (int(lo), None if comma and not hi else int(hi) if hi else int(lo))
            if q[1] is not None and q[1] < q[0]:
                raise self.error(f"the quantifier {{{body}}} is out of order")
        else:
            return None
        if not peek:
            self.i = end
        return q

    def atom(self):
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?<", self.i) and self.p[self.i + 2:self.i + 3] not in ("=", "!"):
                end = self.p.find(">", self.i)
                if end < 0:
                    raise self.error("an unterminated group name")
                self.i = end + 1
            elif self.peek() == "?":
                raise self.error("lookarounds and other (?...) groups are not supported")
            tree = self.alternation()
            if self.peek() != ")":
                raise self.error("an unclosed group")
            self.i += 1
            return tree
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            return ("set", negate(LINE_TERMINATORS))
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "*+?":
            raise self.error(f"nothing to repeat before {c!r}")
        if c in ")":
            raise self.error("unbalanced ')'")
        return ("set", ((ord(c), ord(c)),))

    def escape(self, in_class: bool) -> Ranges:
        c = self.take()
        if c in CLASS_ESCAPES:
            ranges, negated = CLASS_ESCAPES[c]
            return negate(ranges) if negated else ranges
        if c in CONTROL_ESCAPES and not (c == "0" and (self.peek() or "").isdigit()):
            return ((CONTROL_ESCAPES[c],) * 2,)
        if c in "xu":
            n = 2 if c == "x" else 4
            if self.p.startswith("{", self.i) and c == "u":
                end = self.p.find("}", self.i)
                digits, self.i = self.p[self.i + 1:end], end + 1
            else:
                digits, self.i = self.p[self.i:self.i + n], self.i + n
            try:
                cp = int(digits, 16)
            except ValueError:
                raise self.error(f"a bad \\{c} escape") from None
            return ((cp, cp),)
        if c == "c" and (self.peek() or "").isalpha():
            cp = ord(self.take()) % 32
            return ((cp, cp),)
        if c == "b" and in_class:
            return ((0x08, 0x08),)
        if c in "bB":
            raise self.error("word boundaries (\\b, \\B) are not supported")
        if c.isdigit() or c == "k":
            raise self.error("backreferences are not supported")
        if c.isalnum():
            raise self.error(f"an unknown escape \\{c}")
        return ((ord(c), ord(c)),)

    def char_class(self) -> Ranges:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.take()
            if c == "]" and not first:
                break
            if c == "]":
                raise self.error("an empty class [] (it matches nothing)")
            first = False
            lo = self.escape(in_class=True) if c == "\\" else ((ord(c), ord(c)),)
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                d = self.take()
                hi = self.escape(in_class=True) if d == "\\" else ((ord(d), ord(d)),)
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise self.error("a range with a class at an end")
                if hi[0][0] < lo[0][0]:
                    raise self.error("a range out of order")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges.extend(lo)
        out = normalize(ranges)
        return negate(out) if negated else out


def parse(pattern: str):
    """The pattern as a tree, anchors checked: per top-level alternative, (anchored at the start, at the end,
    tree)."""
    tree = _Parser(pattern).parse()
    out = []
    for branch in tree[1] if tree[0] == "alt" else [tree]:
        items = list(branch[1]) if branch[0] == "cat" else [branch]
        start = bool(items) and items[0] == ("bol",)
        end = len(items) > start and items[-1] == ("eol",)
        body = items[start:len(items) - end]
        if _has_anchor(("cat", body)):
            raise BadRequestError(f"pattern {pattern!r}: ^ and $ only at the start and end of the pattern (or of "
                                  "one of its top-level alternatives)")
        out.append((start, end, ("cat", body)))
    return out


def _has_anchor(tree) -> bool:
    kind = tree[0]
    if kind in ("bol", "eol"):
        return True
    if kind in ("cat", "alt"):
        return any(_has_anchor(t) for t in tree[1])
    return kind == "rep" and _has_anchor(tree[1])


# ---- Bytes: a code point range as JSON writes it -----------------------------------------------------------------

def _utf8(cp: int) -> bytes:
    return chr(cp).encode("utf-8", "surrogatepass")


def utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """Code points lo..hi (no surrogates) as UTF-8 byte-range sequences: each a list of (lo, hi) byte ranges, one
    per byte, whose product is exactly a part of the range."""
    for top in (0x7F, 0x7FF, 0xFFFF):  # one encoded length at a time
        if lo <= top < hi:
            return utf8_sequences(lo, top) + utf8_sequences(top + 1, hi)
    if hi <= 0x7F:
        return [[(lo, hi)]]
    for i in (1, 2, 3):  # split until every continuation byte spans its whole range or one value
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                return utf8_sequences(lo, lo | m) + utf8_sequences((lo | m) + 1, hi)
            if hi & m != m:
                return utf8_sequences(lo, (hi & ~m) - 1) + utf8_sequences(hi & ~m, hi)
    return [list(zip(_utf8(lo), _utf8(hi)))]


def json_sequences(ranges: Ranges) -> list[list[tuple[int, int]]]:
    """The byte-range sequences of the characters in `ranges` as a JSON string's content writes them."""
    out: list[list[tuple[int, int]]] = []
    special = [cp for cp in [*range(0x20), 0x22, 0x5C] if any(lo <= cp <= hi for lo, hi in ranges)]
    for cp in special:
        spelled = JSON_SHORT_ESCAPES.get(cp, b"\\u%04x" % cp)
        out.append([(b, b) for b in spelled])
    plain = normalize([(lo, hi) for lo, hi in ranges])
    for hole in ((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C), SURROGATES):
        plain = tuple((a, b) for lo, hi in plain for a, b in ((lo, min(hi, hole[0] - 1)), (max(lo, hole[1] + 1), hi))
                      if a <= b)
    for lo, hi in plain:
        out.extend(utf8_sequences(lo, hi))
    return out


# ---- Automata --------------------------------------------------------------------------------------------------

def raw_sequences(ranges: Ranges) -> list[list[tuple[int, int]]]:
    """The byte-range sequences of the characters in `ranges` as UTF-8 (surrogates left out)."""
    out: list[list[tuple[int, int]]] = []
    for lo, hi in ranges:
        for a, b in ((lo, min(hi, SURROGATES[0] - 1)), (max(lo, SURROGATES[1] + 1), hi)):
            if a <= b:
                out.extend(utf8_sequences(a, b))
    return out


class _NFA:
    """Byte transitions (state -> [(lo, hi, target)]) and epsilon moves; characters as JSON writes them in a
    string, or (`raw`) as UTF-8."""

    def __init__(self, raw: bool = False):
        self.moves: list[list[tuple[int, int, int]]] = []
        self.eps: list[list[int]] = []
        self.sequences: dict[Ranges, list] = {}
        self.spell = raw_sequences if raw else json_sequences
        self.mid: set[int] = set()  # states inside a character's spelling (after its first byte, before its last)

    def new(self) -> int:
        if len(self.moves) >= MAX_NFA_STATES:
            raise BadRequestError(f"pattern: more than {MAX_NFA_STATES} automaton states (counted repetitions "
                                  "too large)")
        self.moves.append([])
        self.eps.append([])
        return len(self.moves) - 1

    def chars(self, a: int, ranges: Ranges, b: int) -> None:
        """a -> b on one character of `ranges`."""
        if ranges not in self.sequences:
            self.sequences[ranges] = self.spell(ranges)
        for seq in self.sequences[ranges]:
            s = a
            for k, (lo, hi) in enumerate(seq):
                if k == len(seq) - 1:
                    t = b
                else:
                    t = self.new()
                    self.mid.add(t)
                self.moves[s].append((lo, hi, t))
                s = t

    def build(self, tree, a: int) -> int:
        """Thompson's construction of `tree` from state a; its end state."""
        kind = tree[0]
        if kind == "set":
            b = self.new()
            self.chars(a, tree[1], b)
            return b
        if kind == "cat":
            for t in tree[1]:
                a = self.build(t, a)
            return a
        if kind == "alt":
            end = self.new()
            for t in tree[1]:
                s = self.new()
                self.eps[a].append(s)
                self.eps[self.build(t, s)].append(end)
            return end
        _, body, lo, hi = tree  # rep
        for _ in range(lo):
            a = self.build(body, a)
        if hi is None:
            s = self.new()
            self.eps[a].append(s)
            self.eps[self.build(body, s)].append(s)
            return s
        end = self.new()
        self.eps[a].append(end)
        for _ in range(hi - lo):
            a = self.build(body, a)
            self.eps[a].append(end)
        return end

    def closure(self, states) -> frozenset:
        seen, todo = set(states), list(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)


class DFA(NamedTuple):
    """A byte automaton: `trans[state][byte]` -> state (state 0 first), `accept`ing states, and `boundary`: the
    states between characters (a byte read there begins one); the others are inside a character's spelling, which
    every reading of the bytes agrees on (a spelling is a prefix code)."""

    trans: list[dict[int, int]]
    accept: set[int]
    boundary: set[int]

    def char_range(self) -> list[tuple[float, float]]:
        """Per state, the fewest and the most characters (inf: no bound) a string needs from there to end."""
        inf = float("inf")
        n = len(self.trans)
        cost = [1 if a in self.boundary else 0 for a in range(n)]  # a character counts where it begins
        back: list[list[int]] = [[] for _ in range(n)]
        for a, row in enumerate(self.trans):
            for t in set(row.values()):
                back[t].append(a)
        lo = [inf] * n  # shortest: 0-1 breadth-first from the accepting states, backwards
        todo = collections.deque(self.accept)
        for a in self.accept:
            lo[a] = 0
        while todo:
            t = todo.popleft()
            for a in back[t]:
                if lo[t] + cost[a] < lo[a]:
                    lo[a] = lo[t] + cost[a]
                    todo.appendleft(a) if cost[a] == 0 else todo.append(a)
        hi: list[float] = [0.0] * n  # longest: depth first; a state that can reach a cycle has no bound
        color = [0] * n  # 0 unseen, 1 on the stack, 2 done
        for root in range(n):
            if color[root]:
                continue
            color[root] = 1
            best = {root: 0.0 if root in self.accept else -inf}
            stack = [(root, iter(set(self.trans[root].values())))]
            while stack:
                a, nexts = stack[-1]
                for t in nexts:
                    if color[t] == 1:  # a cycle
                        best[a] = inf
                    elif color[t] == 2:
                        best[a] = max(best[a], hi[t] + cost[a])
                    else:
                        color[t] = 1
                        best[t] = 0.0 if t in self.accept else -inf
                        stack.append((t, iter(set(self.trans[t].values()))))
                        break
                else:
                    stack.pop()
                    color[a], hi[a] = 2, best.pop(a)
                    if stack:
                        parent = stack[-1][0]
                        best[parent] = max(best[parent], hi[a] + cost[parent])
        return list(zip(lo, hi))


class _Builder:
    """The states of an automaton being built: numbered as they are found (the first is 0), each queued once, at
    most MAX_DFA_STATES of them (BadRequestError naming `what`)."""

    def __init__(self, what: str, first):
        self.what = what
        self.index: dict = {}
        self.trans: list[dict[int, int]] = []
        self.todo: list = []
        self.state(first)

    def state(self, key) -> int:
        i = self.index.get(key)
        if i is None:
            if len(self.index) >= MAX_DFA_STATES:
                raise BadRequestError(f"{self.what}: more than {MAX_DFA_STATES} automaton states")
            i = self.index[key] = len(self.trans)
            self.trans.append({})
            self.todo.append(key)
        return i


def _determinize(nfa: _NFA, start: int, accept: int) -> DFA:
    built = _Builder("pattern", nfa.closure([start]))
    while built.todo:
        cur = built.todo.pop()
        by_byte: dict[int, set[int]] = {}
        for s in cur:
            for lo, hi, t in nfa.moves[s]:
                for b in range(lo, hi + 1):
                    by_byte.setdefault(b, set()).add(t)
        row = built.trans[built.index[cur]]
        for b, targets in by_byte.items():
            row[b] = built.state(nfa.closure(targets))
    return DFA(built.trans, {i for states, i in built.index.items() if accept in states},
               {i for states, i in built.index.items() if not states & nfa.mid})


def _live(trans: list[dict[int, int]], accept: set[int], boundary: set[int] = frozenset()) -> DFA:
    """Without the states from which no accepting one is reachable (the walk must never enter a dead end: a
    string there could not be closed); state 0 stays first (with no moves if nothing matches at all)."""
    back: list[set[int]] = [set() for _ in trans]
    for a, row in enumerate(trans):
        for b in row.values():
            back[b].add(a)
    live, todo = set(accept), list(accept)
    while todo:
        for a in back[todo.pop()]:
            if a not in live:
                live.add(a)
                todo.append(a)
    keep = [0] + [s for s in range(1, len(trans)) if s in live]
    new = {s: i for i, s in enumerate(keep)}
    return DFA([{b: new[t] for b, t in trans[s].items() if t in live} for s in keep],
               {new[s] for s in accept if s in new}, {new[s] for s in boundary if s in new})


def _product(x, y):
    """The automaton of strings both (trans, accept) pairs take."""
    (tx, ax), (ty, ay) = x, y
    built = _Builder("bounds", (0, 0))
    while built.todo:
        a, b = pair = built.todo.pop()
        row = built.trans[built.index[pair]]
        for byte, na in tx[a].items():
            nb = ty[b].get(byte)
            if nb is not None:
                row[byte] = built.state((na, nb))
    return built.trans, {i for (a, b), i in built.index.items() if a in ax and b in ay}


def compile_pattern(pattern: str, raw: bool = False) -> DFA:
    """A DFA over the bytes of a JSON string's content whose strings match `pattern` (somewhere, unless anchored);
    with `raw`, over UTF-8 text that matches it whole. BadRequestError names what is not supported."""
    if not isinstance(pattern, str):
        raise BadRequestError(f"pattern must be a string, got {pattern!r}")
    nfa = _NFA(raw)
    start, accept = nfa.new(), nfa.new()
    anything = ("rep", ("set", ANY), 0, None)
    for at_start, at_end, body in parse(pattern):
        s = nfa.new()
        nfa.eps[start].append(s)
        whole = ("cat", ([] if at_start or raw else [anything]) + [body] + ([] if at_end or raw else [anything]))
        nfa.eps[nfa.build(whole, s)].append(accept)
    dfa = _live(*_determinize(nfa, start, accept))
    if not dfa.accept:
        raise BadRequestError(f"pattern {pattern!r}: no string matches it")
    return dfa


# ---- Numbers with bounds ----------------------------------------------------------------------------------------
# minimum / maximum / exclusiveMinimum / exclusiveMaximum: the JSON numbers in range as a regular language over
# their digits (no exponent: a bounded number is written in plain decimal), one side at a time, then intersected.

def _int_gt(n: str) -> list[str]:
    """Regexes of the canonical non-negative integers greater than n."""
    out = [f"[1-9]\\d{{{len(n)},}}"]  # more digits
    for i, d in enumerate(n):
        low = int(d) + 1
        if low <= 9:
            out.append(f"{n[:i]}[{low}-9]\\d{{{len(n) - i - 1}}}")
    return out


def _int_lt(n: str) -> list[str]:
    """Regexes of the canonical non-negative integers less than n."""
    out = ["0"] if n != "0" and len(n) > 1 else []
    if len(n) > 2:
        out.append(f"[1-9]\\d{{0,{len(n) - 2}}}")
    elif len(n) == 2:
        out.append("[1-9]")
    for i, d in enumerate(n):
        low = 1 if i == 0 and len(n) > 1 else 0
        if int(d) - 1 >= low:
            out.append(f"{n[:i]}[{low}-{int(d) - 1}]\\d{{{len(n) - i - 1}}}")
    return out


NOTHING = "[^\\s\\S]"  # a class of no character: a regex no string matches


def _frac(f: str, above: bool, strict: bool) -> str:
    """The fraction `\\.F` (optional where no fraction is right) with 0.F >= 0.f (`above`; > when strict) or
    <= (<); f has no trailing zeros."""
    if not f:
        if above:
            return "\\.\\d*[1-9]\\d*" if strict else "(?:\\.\\d+)?"
        return NOTHING if strict else "(?:\\.0+)?"
    alts = []
    for i, d in enumerate(f):
        if above and int(d) < 9:
            alts.append(f"{f[:i]}[{int(d) + 1}-9]\\d*")
        if not above and int(d) > 0:
            alts.append(f"{f[:i]}[0-{int(d) - 1}]\\d*")
        if not above and i:
            alts.append(f[:i])  # a shorter fraction is less: f has no trailing zeros
    if above:
        alts.append(f"{f}\\d*[1-9]\\d*" if strict else f"{f}\\d*")
    elif not strict:
        alts.append(f"{f}0*")
    return f"\\.(?:{'|'.join(alts)})" if above else f"(?:\\.(?:{'|'.join(alts)}))?"


def _unsigned(c: str, above: bool, strict: bool, integer: bool) -> str:
    """A regex of the non-negative numbers >= c (`above`) or <= c, strictly when `strict` (c a plain decimal;
    a whole one and strict False for integers)."""
    whole, _, f = c.partition(".")
    ints = _int_gt(whole) if above else _int_lt(whole)
    if integer:
        return "|".join([*ints, whole])
    return "|".join([*(f"(?:{r})(?:\\.\\d+)?" for r in ints), whole + _frac(f.rstrip("0"), above, strict)])


def number_patterns(integer: bool, bounds: dict) -> list[str]:
    """Anchored regexes (all must match) of the JSON numbers within these bounds ({"minimum": v, ...}), written
    without an exponent."""
    unsigned = "(?:0|[1-9]\\d*)" if integer else "(?:0|[1-9]\\d*)(?:\\.\\d+)?"
    out = []
    for key, value in bounds.items():
        above, strict = key in ("minimum", "exclusiveMinimum"), key.startswith("exclusive")
        v = Decimal(str(value))
        if integer:  # the nearest whole bound inside, inclusive
            v = Decimal(math.floor(v) + 1 if above and strict else math.ceil(v) if above else
                        math.ceil(v) - 1 if strict else math.floor(v))
            strict = False
        m = format(abs(v), "f")
        if above and v >= 0:
            out.append(f"^(?:{_unsigned(m, True, strict, integer)})$")
        elif above:  # every non-negative number, and the negative ones down to v
            out.append(f"^(?:{unsigned}|-(?:{_unsigned(m, False, strict, integer)}))$")
        elif v < 0 or (v == 0 and strict):  # negative numbers from v down
            out.append(f"^-(?:{_unsigned(m, True, strict, integer)})$")
        else:  # the non-negative numbers up to v, and every negative one
            out.append(f"^(?:{_unsigned(m, False, strict, integer)}|-{unsigned})$")
    return out


def _multiples(integer: bool, step) -> tuple[list[dict[int, int]], set[int]]:
    """(transitions, accepting states) of the JSON numbers that are multiples of `step` (multipleOf), written
    without an exponent and with no more fraction digits than the step has; a state holds the digits' value so
    far modulo the step (scaled to an integer)."""
    d = max(0, -Decimal(str(step)).normalize().as_tuple().exponent)  # the step's fraction digits
    p = int(Decimal(str(step)).scaleb(d))  # step * 10^d, an integer
    if integer:  # integers that are multiples of p / 10^d: multiples of p / gcd(p, 10^d)
        p, d = p // math.gcd(p, 10 ** d), 0
    built = _Builder(f"multipleOf {step}", ("start", 0, 0))
    accept: set[int] = set()
    while built.todo:
        key = built.todo.pop()
        phase, r, f = key
        row = built.trans[built.index[key]]
        if phase in ("zero", "int", "frac") and r * 10 ** (d - f) % p == 0:
            accept.add(built.index[key])
        if phase in ("start", "minus"):
            row[0x30] = built.state(("zero", 0, 0))
        if phase == "start":
            row[0x2D] = built.state(("minus", 0, 0))
        if phase in ("start", "minus", "int"):
            for digit in range(0 if phase == "int" else 1, 10):
                row[0x30 + digit] = built.state(("int", (r * 10 + digit) % p, 0))
        if phase in ("dot", "frac") and f < d:
            for digit in range(10):
                row[0x30 + digit] = built.state(("frac", (r * 10 + digit) % p, f + 1))
        if phase in ("zero", "int") and d:
            row[0x2E] = built.state(("dot", r, 0))
    return built.trans, accept


def compile_number(integer: bool, bounds: dict, multiple_of=None) -> DFA:
    """A DFA over the bytes of the JSON numbers (integers) within `bounds` ({"minimum": v, ...}) that are
    multiples of `multiple_of` (None: any)."""
    dfa = None
    for regex in number_patterns(integer, bounds):
        nfa = _NFA()
        start, accept = nfa.new(), nfa.new()
        for _, _, body in parse(regex):
            nfa.eps[nfa.build(body, start)].append(accept)
        one = _determinize(nfa, start, accept)[:2]
        dfa = one if dfa is None else _product(dfa, one)
    if multiple_of is not None:
        one = _multiples(integer, multiple_of)
        dfa = one if dfa is None else _product(dfa, one)
    dfa = _live(*dfa)
    if not dfa[1]:
        what = f"within {bounds}" if multiple_of is None else f"within {bounds} and a multiple of {multiple_of}"
        raise BadRequestError(f"no {'integer' if integer else 'number'} is {what}")
    return dfa


def escape(text: str) -> str:
    """`text` as a pattern that matches it literally."""
    return "".join("\\" + c if c.isascii() and not c.isalnum() and c not in " \n\t" else c for c in text)
