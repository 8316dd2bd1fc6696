"""JSON-schema mode (response_format {"type": "json_schema", "json_schema": {"schema": ...}}): the output is one
JSON value of the schema (also here: the tool-call and regular-expression grammars, ToolCallGrammar and
RegexGrammar). The schema compiles to a tree of nodes and a byte automaton over it; masks come from
json_mode.TokenGrammar, as in JSON mode.

What a schema may say, as OpenAI's strict structured outputs do: objects whose properties are written in the
schema's order, every one of them (a property not in `required` is written too, which the schema allows);
arrays of `items` with `minItems` / `maxItems`; strings, numbers, integers, booleans, null; `enum` and `const` of
scalars; `anyOf` / `oneOf` and type lists (Optional[X] is `anyOf: [X, {"type": "null"}]`; alternatives that
begin alike are followed side by side until the output tells them apart, as pydantic's unions of models need);
`$ref` into `$defs` / `definitions`, recursive ones too; strings' `minLength` and `maxLength` (in code points, an
escape being one), their `pattern` (json_regex.py: ECMA regular expressions' regular part; with the length limits
too) and formats date, time and date-time (RFC 3339, with an offset; any month may have 31 days), uuid, email,
hostname, ipv4, ipv6 and duration (ISO 8601; as patterns); numbers' and integers' `minimum`, `maximum`,
`exclusiveMinimum`, `exclusiveMaximum` and `multipleOf` (such a number is written without an exponent). Keywords
that would constrain the value further (other formats, `uniqueItems`, ...) are refused with an error naming them,
rather than ignored. The top-level value is an object.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

from punica.engine.json_mode import (
    ESCAPES,
    HEX_DIGITS,
    MAX_DEPTH,
    NUMBER_END,
    NUMBER_ENDED,
    WHITESPACE,
    WS_MAX,
    TokenGrammar,
    Vocabulary,
    number_start,
    number_step,
)
from punica.engine.json_regex import compile_number, compile_pattern
from punica.errors import BadRequestError

ANNOTATIONS = frozenset(("title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs",
                         "definitions", "additionalProperties", "required", "strict", "deprecated", "readOnly",
                         "writeOnly", "discriminator"))  # discriminator: the alternatives' own const tells them apart
KEYWORDS = frozenset(("type", "properties", "items", "minItems", "maxItems", "enum", "const", "anyOf", "oneOf",
                      "$ref", "format", "minLength", "maxLength", "pattern", "minimum", "maximum",
                      "exclusiveMinimum", "exclusiveMaximum", "multipleOf")) | ANNOTATIONS
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
MAX_NODES = 4096  # nodes of one compiled schema at most
MAX_PATHS = 64  # readings of the output kept at once where a union's alternatives begin alike (more: the first)

OBJECT, ARRAY, STRING, NUMBER, INTEGER, LITERALS, UNION = range(7)
FIRST = {"object": frozenset(b"{"), "array": frozenset(b"["), "string": frozenset(b'"'),
         "number": frozenset(b"-0123456789"), "integer": frozenset(b"-0123456789"), "boolean": frozenset(b"tf"),
         "null": frozenset(b"n")}  # the bytes a value of each type begins with

# phases of a frame
# (past json_mode's number phases, MINUS .. EXP, which numbers' frames take)
START, KEY_START, KEY, COLON, VALUE, AFTER, ARR_OPEN, ARR_AFTER, ARR_NEXT, STR, ESC, HEX, LIT = range(20, 33)
FMT = 33  # a string of a `format` or `pattern`: aux is the state of its Pattern
BOUNDED = 34  # a number with bounds: aux is the state of its Pattern (over the number's own bytes)
_SPACED = frozenset((START, KEY_START, COLON, VALUE, AFTER, ARR_OPEN, ARR_AFTER, ARR_NEXT))


class Pattern:
    """A DFA over the bytes of a string's content (quotes excluded): state 0 first, `accept` where it may end.
    For a `pattern` with length limits, also `boundary` (states where a byte begins a character) and `chars`
    (per state, the fewest and most characters a string needs from there: json_regex.DFA.char_range)."""

    def __init__(self, trans: list[dict[int, int]] | None = None, accept: set[int] | None = None,
                 boundary: set[int] = frozenset()):
        self.trans = trans if trans is not None else [{}]
        self.accept = accept if accept is not None else set()
        self.boundary = boundary
        self.chars: list[tuple[float, float]] = []

    def new(self) -> int:
        self.trans.append({})
        return len(self.trans) - 1

    def add(self, a: int, chars, b: int) -> None:
        for c in chars:
            self.trans[a][c] = b

    def seq(self, a: int, *charsets) -> int:
        """Bytes of these sets one after another from state a; the state after them."""
        for chars in charsets:
            b = self.new()
            self.add(a, chars, b)
            a = b
        return a

    def two_digits(self, a: int, lo: int, hi: int) -> int:
        """A two-digit number from lo to hi from state a; the state after it."""
        end = self.new()
        for tens in range(lo // 10, hi // 10 + 1):
            mid = self.new()
            self.add(a, [0x30 + tens], mid)
            self.add(mid, [0x30 + d for d in range(10) if lo <= 10 * tens + d <= hi], end)
        return end


_D, _X = b"0123456789", b"0123456789abcdefABCDEF"


def _date(p: Pattern, a: int) -> int:  # YYYY-MM-DD (day 01-31 in every month)
    return p.two_digits(p.seq(p.two_digits(p.seq(a, _D, _D, _D, _D, b"-"), 1, 12), b"-"), 1, 31)


def _time(p: Pattern, a: int) -> None:  # HH:MM:SS[.f+](Z|+HH:MM|-HH:MM), RFC 3339's full-time
    sec = p.two_digits(p.seq(p.two_digits(p.seq(p.two_digits(a, 0, 23), b":"), 0, 59), b":"), 0, 59)
    frac = p.new()
    p.add(p.seq(sec, b"."), _D, frac)
    p.add(frac, _D, frac)
    zulu, sign = p.new(), p.new()
    for s in (sec, frac):
        p.add(s, b"Z", zulu)
        p.add(s, b"+-", sign)
    p.accept |= {zulu, p.two_digits(p.seq(p.two_digits(sign, 0, 23), b":"), 0, 59)}


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_H16 = "[0-9A-Fa-f]{1,4}"
_SECONDS = r"\d+(?:\.\d+)?S"
_TIME_PART = rf"T(?:\d+H(?:\d+M)?(?:{_SECONDS})?|\d+M(?:{_SECONDS})?|{_SECONDS})"
# formats as patterns (json_regex.py), anchored: what OpenAI's strict mode lists beside the date and time ones
FORMAT_PATTERNS = {
    "email": rf"^[A-Za-z0-9.!#$%&'*+/=?^_`{{|}}~-]+@{_LABEL}(?:\.{_LABEL})+$",
    "hostname": rf"^{_LABEL}(?:\.{_LABEL})*$",
    "ipv4": rf"^(?:{_OCTET}\.){{3}}{_OCTET}$",
    "ipv6": "^(?:" + "|".join([
        rf"(?:{_H16}:){{7}}{_H16}", rf"(?:{_H16}:){{1,7}}:", *(
            rf"(?:{_H16}:){{1,{7 - k}}}(?::{_H16}){{1,{k}}}" for k in range(1, 7)),
        rf":(?::{_H16}){{1,7}}", "::"]) + ")$",
    "duration": (r"^P(?:\d+Y(?:\d+M)?(?:\d+W)?(?:\d+D)?|\d+M(?:\d+W)?(?:\d+D)?|\d+W(?:\d+D)?|\d+D)"
                 rf"(?:{_TIME_PART})?$|^P{_TIME_PART}$"),
}


@functools.lru_cache(maxsize=None)
def _format(name: str) -> Pattern:
    if name in FORMAT_PATTERNS:
        return Pattern(*compile_pattern(FORMAT_PATTERNS[name]))
    p = Pattern()
    if name == "date":
        p.accept.add(_date(p, 0))
    elif name == "time":
        _time(p, 0)
    elif name == "date-time":
        _time(p, p.seq(_date(p, 0), b"T"))
    else:  # uuid: 8-4-4-4-12 hex digits
        p.accept.add(p.seq(0, *[_X] * 8, b"-", *[_X] * 4, b"-", *[_X] * 4, b"-", *[_X] * 4, b"-", *[_X] * 12))
    return p


FORMATS = ("date", "date-time", "time", "uuid", *FORMAT_PATTERNS)


@dataclass
class Node:
    kind: int
    keys: list[bytes] = field(default_factory=list)  # OBJECT: each property's name as JSON, quotes included
    values: list[int] = field(default_factory=list)  # OBJECT: their nodes; ARRAY: [items]
    min_items: int = 0
    max_items: int | None = None
    literals: list[bytes] = field(default_factory=list)  # LITERALS: each value as compact JSON
    by_byte: dict[int, tuple[int, ...]] = field(default_factory=dict)  # UNION: first byte -> the alternatives
    pattern: Pattern | None = None  # STRING of a `format` or `pattern` (its length limits counted as it is
    # written: min_len, max_len, Pattern.chars); NUMBER and INTEGER with bounds: their digits
    min_len: int = 0  # STRING: characters (code points; an escape is one)
    max_len: int | None = None
    first: frozenset = frozenset()  # the bytes a value of this node may begin with


def compile_schema(schema) -> tuple[list[Node], int]:
    """(the schema's nodes, the root's index). BadRequestError names what is not supported."""
    if not isinstance(schema, dict):
        raise BadRequestError(f"json_schema.schema must be a JSON object, got {type(schema).__name__}")
    nodes: list[Node] = []
    refs: dict[str, int] = {}
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}

    def add(node: Node) -> int:
        if len(nodes) >= MAX_NODES:
            raise BadRequestError(f"json_schema: more than {MAX_NODES} nodes")
        nodes.append(node)
        return len(nodes) - 1

    def build(s, where: str) -> int:
        if not isinstance(s, dict):
            raise BadRequestError(f"json_schema at {where}: a schema must be an object, got {s!r}")
        unknown = sorted(set(s) - KEYWORDS)
        if unknown:
            raise BadRequestError(f"json_schema at {where}: unsupported keyword(s) {', '.join(unknown)} (supported: "
                                  f"{', '.join(sorted(KEYWORDS - ANNOTATIONS))})")
        if "$ref" in s:
            return ref(s["$ref"], where)
        if "const" in s:
            return literals([s["const"]], where)
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise BadRequestError(f"json_schema at {where}: enum must be a non-empty list")
            return literals(s["enum"], where)
        for key in ("anyOf", "oneOf"):
            if key in s:
                if not isinstance(s[key], list) or not s[key]:
                    raise BadRequestError(f"json_schema at {where}: {key} must be a non-empty list")
                return union([build(alt, f"{where}.{key}[{i}]") for i, alt in enumerate(s[key])], where)
        kind = s.get("type")
        if isinstance(kind, list):
            return union([build({**s, "type": k}, f"{where}.type[{i}]") for i, k in enumerate(kind)], where)
        if kind == "object":
            props = s.get("properties", {})
            if not isinstance(props, dict):
                raise BadRequestError(f"json_schema at {where}: properties must be an object")
            missing = [r for r in s.get("required", ()) if r not in props]
            if missing:
                raise BadRequestError(f"json_schema at {where}: required {missing} not in properties")
            i = add(Node(OBJECT, first=FIRST["object"]))
            nodes[i].keys = [json.dumps(k, ensure_ascii=False).encode() for k in props]
            nodes[i].values = [build(v, f"{where}.{k}") for k, v in props.items()]
            return i
        if kind == "array":
            if "items" not in s:
                raise BadRequestError(f"json_schema at {where}: an array needs `items`")
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            if not isinstance(lo, int) or lo < 0 or hi is not None and (not isinstance(hi, int) or hi < max(lo, 1)):
                raise BadRequestError(f"json_schema at {where}: minItems {lo!r} / maxItems {hi!r}")
            i = add(Node(ARRAY, min_items=lo, max_items=hi, first=FIRST["array"]))
            nodes[i].values = [build(s["items"], f"{where}[]")]
            return i
        if kind == "string":
            fmt = s.get("format")
            if fmt is not None and fmt not in FORMATS:
                raise BadRequestError(f"json_schema at {where}: format {fmt!r} is not supported (supported: "
                                      f"{', '.join(FORMATS)})")
            lo, hi = s.get("minLength", 0), s.get("maxLength")
            if not isinstance(lo, int) or lo < 0 or hi is not None and (not isinstance(hi, int) or hi < lo):
                raise BadRequestError(f"json_schema at {where}: minLength {lo!r} / maxLength {hi!r}")
            regex = s.get("pattern")
            if fmt is not None and (lo or hi is not None or regex is not None):
                raise BadRequestError(f"json_schema at {where}: a format with minLength / maxLength / pattern")
            if regex is not None:
                try:
                    compiled = compile_pattern(regex)
                except BadRequestError as e:
                    raise BadRequestError(f"json_schema at {where}: {e}") from None
                dfa = Pattern(*compiled)
                if lo or hi is not None:  # counted as the string is written (FMT), never into a dead end
                    dfa.chars = compiled.char_range()
                    fewest, most = dfa.chars[0]
                    if (hi is not None and fewest > hi) or most < lo:
                        raise BadRequestError(f"json_schema at {where}: no string of {lo} to {hi} characters matches "
                                              f"pattern {regex!r}")
                return add(Node(STRING, first=FIRST["string"], pattern=dfa, min_len=lo, max_len=hi))
            return add(Node(STRING, first=FIRST["string"], pattern=None if fmt is None else _format(fmt),
                            min_len=lo, max_len=hi))
        if kind in ("number", "integer"):
            bounds = {k: s[k] for k in BOUNDS if k in s}
            step = s.get("multipleOf")
            given = {**bounds, **({} if step is None else {"multipleOf": step})}
            bad = [k for k, v in given.items() if isinstance(v, bool) or not isinstance(v, (int, float))
                   or not math.isfinite(v) or (k == "multipleOf" and v <= 0)]
            if bad:
                raise BadRequestError(f"json_schema at {where}: {', '.join(bad)} must be a finite number (multipleOf: "
                                      "above zero)")
            if not bounds and step is None:
                return add(Node(NUMBER if kind == "number" else INTEGER, first=FIRST[kind]))
            try:
                dfa = Pattern(*compile_number(kind == "integer", bounds, step))
            except BadRequestError as e:
                raise BadRequestError(f"json_schema at {where}: {e}") from None
            return add(Node(NUMBER if kind == "number" else INTEGER, pattern=dfa,
                            first=frozenset(dfa.trans[0])))
        if kind == "boolean":
            return literals([True, False], where)
        if kind == "null":
            return literals([None], where)
        raise BadRequestError(f"json_schema at {where}: give the value a type (object, array, string, number, "
                              f"integer, boolean, null), an enum, a const, anyOf or $ref; got type {kind!r}")

    def ref(target, where: str) -> int:
        if not isinstance(target, str):
            raise BadRequestError(f"json_schema at {where}: $ref must be a string, got {target!r}")
        if target in refs:
            return refs[target]
        for prefix in ("#/$defs/", "#/definitions/"):
            if target.startswith(prefix) and target[len(prefix):] in defs:
                definition = defs[target[len(prefix):]]
                # a placeholder that recursive refs point to meanwhile, replaced by the definition's node
                i = refs[target] = add(Node(UNION, first=first_bytes(definition, set())))
                nodes[i] = nodes[build(definition, target)]
                return i
        raise BadRequestError(f"json_schema at {where}: $ref {target!r} is not a #/$defs/ (or #/definitions/) name")

    def literals(values: list, where: str) -> int:
        if any(isinstance(v, (dict, list)) for v in values):
            raise BadRequestError(f"json_schema at {where}: enum and const values must be strings, numbers, "
                                  "booleans or null")
        lits = sorted({json.dumps(v, ensure_ascii=False).encode() for v in values})
        return add(Node(LITERALS, literals=lits, first=frozenset(lit[0] for lit in lits)))

    def first_bytes(s, seen: set) -> frozenset:
        """The bytes a value of schema s may begin with, without building it (for a $ref being built)."""
        if not isinstance(s, dict):
            return frozenset()
        if "$ref" in s:
            name = str(s["$ref"]).rpartition("/")[2]
            if name in seen or name not in defs:
                return frozenset()
            return first_bytes(defs[name], seen | {name})
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"] if isinstance(s["enum"], list) else []
            return frozenset(json.dumps(v)[0].encode()[0] for v in values)
        alts = s.get("anyOf") or s.get("oneOf")
        if isinstance(alts, list):
            return frozenset().union(*(first_bytes(a, seen) for a in alts))
        kinds = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
        return frozenset().union(*(FIRST.get(k, frozenset()) for k in kinds if isinstance(k, str)))

    def union(alts: list[int], where: str) -> int:
        by_byte: dict[int, tuple[int, ...]] = {}
        for alt in alts:
            if not nodes[alt].first:
                raise BadRequestError(f"json_schema at {where}: a $ref that only refers to itself")
            for b in nodes[alt].first:
                by_byte[b] = (*by_byte.get(b, ()), alt)
        return add(Node(UNION, by_byte=by_byte, first=frozenset(by_byte)))

    root = build(schema, "$")
    if nodes[root].kind != OBJECT:
        raise BadRequestError("json_schema: the top-level value must be an object (type: object)")
    return nodes, root


class SchemaGrammar(TokenGrammar):
    """States are (frames, ws): a stack of (node, phase, aux) for the values being written, innermost last (empty:
    done), and the whitespace bytes just read. Where alternatives of a union begin alike, the state is a frozenset
    of such states, one per reading still possible (at most MAX_PATHS), until the output tells them apart."""

    def __init__(self, vocab: Vocabulary, schema):
        super().__init__(vocab)
        self.nodes, root = compile_schema(schema)
        self.start = (((root, START, 0),), 0)

    def done(self, s) -> bool:
        return any(not p[0] for p in s) if isinstance(s, frozenset) else not s[0]

    def in_string(self, s) -> bool:  # a string without maxLength: every plain token may follow
        if isinstance(s, frozenset):
            return all(self.in_string(p) for p in s)
        return bool(s[0]) and s[0][-1][1] == STR and self.nodes[s[0][-1][0]].max_len is None

    def allowed(self, s) -> list[int]:
        frames = () if isinstance(s, frozenset) else s[0]
        if not frames or frames[-1][1] != STR or self.nodes[frames[-1][0]].max_len is None:
            return super().allowed(s)
        room = self.nodes[frames[-1][0]].max_len - frames[-1][2]  # a string with maxLength: plain tokens that fit
        out = [i for chars, ids in self.vocab.plain_by_chars.items() if chars <= room for i in ids]
        self._walk(self.vocab.marked.root, s, out)
        return out

    def step(self, s, b: int):
        """The state after byte b: one state, a frozenset of them (several readings), or None."""
        if type(s) is not frozenset:
            out = self._step(s, b)
            if len(out) == 1:  # the common case: one reading
                return out[0]
            out = list(set(out))
        else:
            out = list({r for p in s for r in self._step(p, b)})
        if not out:
            return None
        if len(out) == 1:
            return out[0]
        return frozenset(sorted(out, key=repr)[:MAX_PATHS] if len(out) > MAX_PATHS else out)

    def _step(self, s, b: int) -> list:
        """The states after byte b from one state (several where a union's alternatives begin alike)."""
        frames, ws = s
        if not frames:
            return []
        node_id, phase, aux = frames[-1]
        node = self.nodes[node_id]
        if b in WHITESPACE:
            if phase in _SPACED:
                return [(frames, ws + 1)] if ws < WS_MAX else []
            if phase in NUMBER_END:
                return self._step((self._pop(frames), 0), b)
        below = frames[:-1]
        if phase == STR:  # aux: characters so far, where the node counts them
            if b == 0x22:
                return [(self._pop(frames), 0)] if aux >= node.min_len else []
            if b < 0x20:
                return []
            counted = node.min_len or node.max_len is not None
            if not counted or (b != 0x5C and b & 0xC0 == 0x80):  # a UTF-8 continuation byte: no new character
                return [(below + ((node_id, ESC, aux),), 0) if b == 0x5C else (frames, 0)]
            n = aux + 1
            if node.max_len is not None and n > node.max_len:
                return []
            n = n if node.max_len is not None else min(n, node.min_len)  # past minLength all counts look alike
            return [(below + ((node_id, ESC if b == 0x5C else STR, n),), 0)]
        if phase == START:
            return self._begin(below, node_id, b)
        if phase == KEY_START:
            if not node.keys and b == 0x7D:
                return [(self._pop(frames), 0)]
            if aux < len(node.keys) and b == node.keys[aux][0]:
                return [(below + ((node_id, KEY, (aux, 1)),), 0)]
            return []
        if phase == KEY:
            i, m = aux
            key = node.keys[i]
            if b != key[m]:
                return []
            return [(below + ((node_id, COLON, i) if m + 1 == len(key) else (node_id, KEY, (i, m + 1)),), 0)]
        if phase == COLON:
            return [(below + ((node_id, VALUE, aux),), 0)] if b == 0x3A else []
        if phase == VALUE:
            return self._begin(frames, node.values[aux], b)
        if phase == AFTER:
            if b == 0x2C and aux + 1 < len(node.keys):
                return [(below + ((node_id, KEY_START, aux + 1),), 0)]
            return [(self._pop(frames), 0)] if b == 0x7D and aux + 1 == len(node.keys) else []
        if phase in (ARR_OPEN, ARR_NEXT):
            if phase == ARR_OPEN and b == 0x5D and node.min_items == 0:
                return [(self._pop(frames), 0)]
            return self._begin(frames, node.values[0], b)
        if phase == ARR_AFTER:
            if b == 0x2C and (node.max_items is None or aux < node.max_items):
                return [(below + ((node_id, ARR_NEXT, aux),), 0)]
            return [(self._pop(frames), 0)] if b == 0x5D and aux >= node.min_items else []
        if phase == ESC:  # aux: the string's characters, this escape's included
            if b in ESCAPES:
                return [(below + ((node_id, STR, aux),), 0)]
            return [(below + ((node_id, HEX, aux * 8 + 4),), 0)] if b == 0x75 else []
        if phase == HEX:  # aux: characters * 8 + hex digits left
            if b not in HEX_DIGITS:
                return []
            return [(below + ((node_id, HEX, aux - 1) if aux % 8 > 1 else (node_id, STR, aux // 8),), 0)]
        if phase == FMT:  # aux: the pattern's state; with length limits, (state, characters so far)
            pattern = node.pattern
            if not pattern.chars:
                if b == 0x22:
                    return [(self._pop(frames), 0)] if aux in pattern.accept else []
                nxt = pattern.trans[aux].get(b)
                return [] if nxt is None else [(below + ((node_id, FMT, nxt),), 0)]
            state, n = aux
            if b == 0x22:
                return [(self._pop(frames), 0)] if state in pattern.accept and n >= node.min_len else []
            nxt = pattern.trans[state].get(b)
            if nxt is None:
                return []
            n += state in pattern.boundary  # b begins a character
            fewest, most = pattern.chars[nxt]  # what is left must fit the limits
            if (node.max_len is not None and n + fewest > node.max_len) or n + most < node.min_len:
                return []
            return [(below + ((node_id, FMT, (nxt, n if node.max_len is not None else min(n, node.min_len))),), 0)]
        if phase == BOUNDED:
            nxt = node.pattern.trans[aux].get(b)
            if nxt is not None:
                return [(below + ((node_id, BOUNDED, nxt),), 0)]
            return self._step((self._pop(frames), 0), b) if aux in node.pattern.accept else []  # b follows it
        if phase == LIT:
            matched = aux + bytes([b])
            longer = [lit for lit in node.literals if lit.startswith(matched)]
            if longer:
                if longer == [matched]:  # complete, and no other literal goes on
                    return [(self._pop(frames), 0)]
                return [(below + ((node_id, LIT, matched),), 0)]
            if aux in node.literals:  # complete: b is what follows it
                return self._step((self._pop(frames), 0), b)
            return []
        return self._number(frames, node, node_id, phase, b)

    def _number(self, frames: tuple, node: Node, node_id: int, phase: int, b: int) -> list:
        nxt = number_step(phase, b, node.kind == INTEGER)
        if nxt == NUMBER_ENDED:  # b is what follows the number
            return self._step((self._pop(frames), 0), b)
        return [] if nxt is None else [(frames, 0) if nxt == phase else (frames[:-1] + ((node_id, nxt, 0),), 0)]

    def _begin(self, frames: tuple, node_id: int, b: int, unions: frozenset = frozenset()) -> list:
        """Start a value of node `node_id` with byte b, above `frames`: the states after b, one per alternative of
        a union that may begin with it (`unions`: those being expanded, which a left-recursive $ref meets again)."""
        node = self.nodes[node_id]
        if node.kind == UNION:
            if node_id in unions:
                return []
            return [r for alt in node.by_byte.get(b, ()) for r in self._begin(frames, alt, b, unions | {node_id})]
        if b not in node.first:
            return []
        if node.kind in (OBJECT, ARRAY):
            if len(frames) >= MAX_DEPTH:
                return []
            return [(frames + ((node_id, KEY_START if node.kind == OBJECT else ARR_OPEN, 0),), 0)]
        if node.kind == STRING:
            if node.pattern is None:
                return [(frames + ((node_id, STR, 0),), 0)]
            return [(frames + ((node_id, FMT, (0, 0) if node.pattern.chars else 0),), 0)]
        if node.kind in (NUMBER, INTEGER):
            if node.pattern is not None:
                return [(frames + ((node_id, BOUNDED, node.pattern.trans[0][b]),), 0)]
            return [(frames + ((node_id, number_start(b), 0),), 0)]
        return self._step((frames + ((node_id, LIT, b""),), 0), b)  # LITERALS

    def _pop(self, frames: tuple) -> tuple:
        """The top value is complete: its container moves past it (empty: the whole output is)."""
        rest = frames[:-1]
        if not rest:
            return ()
        parent, phase, aux = rest[-1]
        if phase == VALUE:
            return rest[:-1] + ((parent, AFTER, aux),)
        node = self.nodes[parent]
        cap = node.max_items if node.max_items is not None else node.min_items  # counts past it look alike
        return rest[:-1] + ((parent, ARR_AFTER, min(aux + 1 if phase == ARR_NEXT else 1, cap + 1)),)


# How a forced tool call is written (SamplingParams.tool_call_shape): the bytes before the tool's name, between
# it and the arguments, and after them. "punica": `name {arguments}`; "hermes": what Qwen2's and Hermes' chat
# templates ask for, `<tool_call>` and a JSON object of the name and the arguments; "llama3": Llama 3.1's JSON
# object of the name and the "parameters".
CALL_SHAPES = {"punica": (b"", b" ", b""),
               "hermes": (b'<tool_call>\n{"name": "', b'", "arguments": ', b"}\n</tool_call>"),
               "llama3": (b'{"name": "', b'", "parameters": ', b"}")}
_PRE, _NAME, _MID, _ARGS, _POST = range(5)


class ToolCallGrammar(TokenGrammar):
    """One call of one of several tools (chat completions' tool_choice "required", or a named one where the call
    is written in a template's shape): the tool's name, then its arguments, one JSON value of that tool's
    schema, framed as CALL_SHAPES says. States (phase, tool index or -1, phase data): the frame's bytes read
    (_PRE, _MID, _POST), the name's bytes so far (_NAME), or the tool's SchemaGrammar state (_ARGS)."""

    def __init__(self, vocab: Vocabulary, tools: dict[str, dict], shape: str = "punica"):
        super().__init__(vocab)
        self.names = [name.encode() for name in tools]
        self.tools = []
        for name, schema in tools.items():
            try:
                self.tools.append(SchemaGrammar(vocab, schema))
            except BadRequestError as e:
                raise BadRequestError(f"tool {name!r}: {e}") from None
        if shape not in CALL_SHAPES:
            raise BadRequestError(f"tool_call_shape must be one of {', '.join(CALL_SHAPES)}, got {shape!r}")
        self.before, self.between, self.after = CALL_SHAPES[shape]
        self.start = (_PRE, -1, 0) if self.before else (_NAME, -1, b"")

    def step(self, s, b: int):
        phase, tool, data = s
        if phase == _ARGS:
            inner = self.tools[tool]
            if inner.done(data):
                return (_POST, tool, 1) if self.after and b == self.after[0] else None
            nxt = inner.step(data, b)
            return None if nxt is None else (_ARGS, tool, nxt)
        if phase == _PRE:
            if b != self.before[data]:
                return None
            return (_PRE, -1, data + 1) if data + 1 < len(self.before) else (_NAME, -1, b"")
        if phase == _NAME:
            if b == self.between[0]:  # the name ends (no name holds this byte)
                if data not in self.names:
                    return None
                tool = self.names.index(data)
                return (_MID, tool, 1) if len(self.between) > 1 else (_ARGS, tool, self.tools[tool].start)
            name = data + bytes((b,))
            return (_NAME, -1, name) if any(n.startswith(name) for n in self.names) else None
        frame = self.between if phase == _MID else self.after
        if data >= len(frame) or b != frame[data]:
            return None
        if phase == _MID and data + 1 == len(frame):
            return _ARGS, tool, self.tools[tool].start
        return phase, tool, data + 1

    def done(self, s) -> bool:
        phase, tool, data = s
        if phase == _POST:
            return data == len(self.after)
        return phase == _ARGS and not self.after and self.tools[tool].done(data)

    def in_string(self, s) -> bool:
        return s[0] == _ARGS and self.tools[s[1]].in_string(s[2])

    def cache_key(self, s):
        return (_ARGS, s[1], self.tools[s[1]].cache_key(s[2])) if s[0] == _ARGS else s

    def allowed(self, s) -> list[int]:
        if s[0] == _ARGS and not self.tools[s[1]].done(s[2]):
            # a token within the arguments (one that also begins the frame after them waits a token: stricter)
            return self.tools[s[1]].allowed(s[2])
        return super().allowed(s)


def _token_ids(node: list) -> list[int]:
    """The ids of every token in a vocabulary trie's subtree (json_mode._Trie nodes)."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        out.extend(n[1])
        todo.extend(n[0].values())
    return out


class AutoCallGrammar(TokenGrammar):
    """A free reply that may be a tool call (tool_choice "auto"). While the output can still begin a call it follows
    the call grammar; once it cannot, it is free text for good (every token allowed). Once it is clearly a call
    (Hermes' `<tool_call>` tag written, or all of Llama 3.1's `{"name": "`, or, in Punica's shape, the arguments
    begun) it must be a whole, valid call, and ends with it. States: ("open" | "call", the ToolCallGrammar state),
    or TEXT."""

    TEXT = ("text",)

    def __init__(self, vocab: Vocabulary, tools: dict[str, dict], shape: str = "punica"):
        super().__init__(vocab)
        self.call = ToolCallGrammar(vocab, tools, shape)
        # a call for sure once this much of its frame is written: Hermes' tag, or all of the frame
        self.commit_at = len(b"<tool_call>") if shape == "hermes" else len(self.call.before)
        self.start = ("open", self.call.start)
        self._everything = list(range(vocab.vocab_size))
        self._specials = frozenset(i for i in self._everything
                                   if i >= len(vocab.token_bytes) or not vocab.token_bytes[i])

    def committed(self, cs) -> bool:
        phase, tool, data = cs
        if self.call.before:
            return phase != _PRE or data >= self.commit_at
        return phase in (_ARGS, _POST) and data != self.call.tools[tool].start

    def step(self, s, b: int):
        if s == self.TEXT:
            return s
        if s == self.start and b in WHITESPACE:  # whitespace before a call (as models often write) leaves it open
            return s
        nxt = self.call.step(s[1], b)
        if nxt is None:
            return None if s[0] == "call" else self.TEXT
        return ("call" if s[0] == "call" or self.committed(nxt) else "open", nxt)

    def advance(self, s, token: int):
        if s == self.TEXT or (s[0] == "open" and token in self._specials):
            return self.TEXT  # special tokens too (an end of turn), as in any free reply
        return super().advance(s, token)

    def done(self, s) -> bool:
        return s != self.TEXT and self.call.done(s[1])

    def free(self, s) -> bool:
        return s == self.TEXT

    def in_string(self, s) -> bool:
        return s != self.TEXT and s[0] == "call" and self.call.in_string(s[1])

    def cache_key(self, s):
        return s if s == self.TEXT else (s[0], self.call.cache_key(s[1]))

    def allowed(self, s) -> list[int]:
        if s == self.TEXT:
            return self._everything
        if s[0] == "call":
            return self.call.allowed(s[1])
        # still open: every token but those that go on to be a call and then break it. Walk the tokens along the
        # call's path only (one that leaves it is text, whatever follows)
        refused: set[int] = set()
        todo = [(self.vocab.trie.root, s)]
        while todo:
            node, state = todo.pop()
            for b, child in node[0].items():
                nxt = self.step(state, b)
                if nxt is None:
                    refused.update(_token_ids(child))
                elif nxt != self.TEXT and child[0]:
                    todo.append((child, nxt))
        return [i for i in self._everything if i not in refused]


class RegexGrammar(TokenGrammar):
    """The whole output matches a regular expression (SamplingParams.regex, .choice): states of its automaton
    over the output's UTF-8 (json_regex.py, raw). Where the output may end, the request's end tokens (EOS, its
    stop token ids) are allowed too; drawing one ends it (state END), as does a state nothing may follow."""

    END = -1

    def __init__(self, vocab: Vocabulary, pattern: str, end_ids: tuple[int, ...]):
        super().__init__(vocab)
        try:
            dfa = compile_pattern(pattern, raw=True)
        except BadRequestError as e:
            raise BadRequestError(f"regex: {e}") from None
        self.trans, self.accept = dfa.trans, dfa.accept
        self.end_ids = sorted({i for i in end_ids if 0 <= i < vocab.vocab_size})
        self._ends = frozenset(self.end_ids)
        if self.trans[0] == {} and not self.end_ids:
            raise BadRequestError(f"regex {pattern!r} matches only the empty output")
        self.start = 0

    def step(self, s: int, b: int):
        return None if s == self.END else self.trans[s].get(b)

    def done(self, s: int) -> bool:
        return s == self.END or (s in self.accept and not self.trans[s])

    def advance(self, s: int, token: int):
        if token in self._ends:
            return self.END if s in self.accept else None
        return super().advance(s, token)

    def allowed(self, s: int) -> list[int]:  # an end token is one only where the output may end, whatever its bytes
        out = [t for t in super().allowed(s) if t not in self._ends]
        return out + self.end_ids if s in self.accept else out
