"""JSON mode (`SamplingParams.json_object`, OpenAI's response_format {"type": "json_object"}): every draw is
restricted to the tokens that keep the output a prefix of one JSON object, and the request stops when that
object closes. Pure Python apart from the masks: no torch below `TokenGrammar.mask`.

A pushdown automaton over bytes (`step`) follows the output. The allowed tokens of a state are found by a walk
over a byte trie of the vocabulary that stops at the first byte the automaton refuses, so a state's mask costs
about as many steps as there are valid token prefixes (inside a string, where most tokens are valid, only the
tokens holding a quote, a backslash or a control byte are walked). Masks are cached by what a token can see of
the state: its mode, the top `SEEN` containers of the stack and its depth. A token that would pop more than `SEEN`
containers is refused (a stricter mask, never a wrong one: one-byte tokens close one container at a time).

Limits that keep a model from running away: at most `MAX_DEPTH` nested containers and `WS_MAX` whitespace bytes
in a row. Numbers and strings follow RFC 8259; the bytes of a string are not checked as UTF-8 (the detokenizer
shows invalid bytes as U+FFFD, which is valid JSON).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import NamedTuple

MAX_DEPTH = 32
WS_MAX = 64
SEEN = 4  # containers of the stack a token may close: the mask cache's key holds this many
MASK_CACHE = 256  # masks kept per grammar (each one bool per vocabulary entry, on the device)

# modes
START, VALUE, ARR_FIRST, KEY_FIRST, KEY, COLON, AFTER, STR, ESC, UHEX, LIT = range(11)
MINUS, ZERO, INT, DOT, FRAC, EXP_MARK, EXP_SIGN, EXP = range(11, 19)
DONE = 19

WHITESPACE = frozenset(b" \t\n\r")
_SPACED = frozenset((START, VALUE, ARR_FIRST, KEY_FIRST, KEY, COLON, AFTER))  # modes where whitespace may come
NUMBER_END = frozenset((ZERO, INT, FRAC, EXP))  # a number may end here
_DIGITS = frozenset(b"0123456789")
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
UNKNOWN = "#"  # a container below the SEEN ones in a cache key's stack


class State(NamedTuple):
    """Where the automaton is: `mode`, the open containers ("o" object, "a" array; innermost last), and per
    mode: STR/ESC whether the string is a key (1) or a value (0), UHEX that flag * 8 + hex digits left, LIT the
    literal's bytes left; `ws` counts the whitespace bytes just read."""

    mode: int
    stack: str = ""
    aux: int | bytes = 0
    ws: int = 0


START_STATE = State(START)


def step(s: State, b: int) -> State | None:
    """The state after byte b, or None where b cannot continue a JSON object."""
    mode, stack = s.mode, s.stack
    if b in WHITESPACE:
        if mode in _SPACED:
            return State(mode, stack, s.aux, s.ws + 1) if s.ws < WS_MAX else None
        if mode in NUMBER_END:
            return State(AFTER, stack, 0, 1)
    if mode == STR:
        if b == 0x22:  # '"'
            return State(COLON if s.aux else AFTER, stack)
        if b == 0x5C:  # '\\'
            return State(ESC, stack, s.aux)
        return s if b >= 0x20 else None
    if mode in (VALUE, ARR_FIRST):
        if mode == ARR_FIRST and b == 0x5D:  # ']'
            return _close(stack, "a")
        return _value(stack, b)
    if mode == AFTER:
        top = stack[-1]
        if b == 0x2C:  # ','
            return None if top == UNKNOWN else State(KEY if top == "o" else VALUE, stack)
        return _close(stack, "o" if b == 0x7D else "a" if b == 0x5D else "")
    if mode == KEY_FIRST:
        return State(STR, stack, 1) if b == 0x22 else _close(stack, "o") if b == 0x7D else None
    if mode == KEY:
        return State(STR, stack, 1) if b == 0x22 else None
    if mode == COLON:
        return State(VALUE, stack) if b == 0x3A else None
    if mode == START:
        return State(KEY_FIRST, "o") if b == 0x7B else None
    if mode == ESC:
        if b in ESCAPES:
            return State(STR, stack, s.aux)
        return State(UHEX, stack, s.aux * 8 + 4) if b == 0x75 else None  # 'u'
    if mode == UHEX:
        if b not in HEX_DIGITS:
            return None
        left = s.aux % 8 - 1
        return State(UHEX, stack, s.aux - 1) if left else State(STR, stack, s.aux // 8)
    if mode == LIT:
        if b != s.aux[0]:
            return None
        return State(LIT, stack, s.aux[1:]) if len(s.aux) > 1 else State(AFTER, stack)
    return _number(s, b)


def _value(stack: str, b: int) -> State | None:
    """The first byte of a value."""
    if b == 0x7B or b == 0x5B:  # '{' '['
        if len(stack) >= MAX_DEPTH:
            return None
        return State(KEY_FIRST, stack + "o") if b == 0x7B else State(ARR_FIRST, stack + "a")
    if b == 0x22:
        return State(STR, stack, 0)
    number = number_start(b)
    if number is not None:
        return State(number, stack)
    literal = _LITERALS.get(b)
    return State(LIT, stack, literal) if literal else None


def _close(stack: str, kind: str) -> State | None:
    """Close the innermost container if it is of this kind ("o" or "a"); the object's end is DONE."""
    if not kind or not stack or stack[-1] != kind:
        return None
    rest = stack[:-1]
    return State(AFTER, rest) if rest else State(DONE)


def _number(s: State, b: int) -> State | None:
    nxt = number_step(s.mode, b)
    if nxt == NUMBER_ENDED:  # b is what follows the number
        return step(State(AFTER, s.stack), b)
    return None if nxt is None else s if nxt == s.mode else State(nxt, s.stack)


NUMBER_ENDED = -1


def number_start(b: int) -> int | None:
    """The phase of a number (RFC 8259) after its first byte b, or None where b cannot begin one."""
    return MINUS if b == 0x2D else (ZERO if b == 0x30 else INT) if b in _DIGITS else None


def number_step(phase: int, b: int, integer: bool = False) -> int | None:
    """A number's phase (MINUS .. EXP) after byte b; NUMBER_ENDED where it ended before b (b follows it); None
    where b can neither go on with it nor follow it. `integer`: no fraction or exponent. Shared by both modes."""
    digit = b in _DIGITS
    if phase == MINUS:
        return (ZERO if b == 0x30 else INT) if digit else None
    if digit and phase in (INT, FRAC, EXP):
        return phase
    if phase in (DOT, EXP_MARK, EXP_SIGN):
        if digit:
            return FRAC if phase == DOT else EXP
        return EXP_SIGN if phase == EXP_MARK and b in (0x2B, 0x2D) else None
    if not integer and phase in (ZERO, INT) and b == 0x2E:  # '.'
        return DOT
    if not integer and phase in (ZERO, INT, FRAC) and b in (0x65, 0x45):  # 'e' 'E'
        return EXP_MARK
    return NUMBER_ENDED if phase in NUMBER_END else None  # a digit after a leading zero, or not a number (DONE)


class Vocabulary:
    """A model's tokens as bytes, in tries for the mask walks; shared by every grammar of the model.
    `token_bytes[i]`: token i's bytes, None for tokens constrained requests never draw (special tokens);
    `vocab_size`: the model's logits width (ids past token_bytes are never drawn)."""

    def __init__(self, token_bytes: list[bytes | None], vocab_size: int):
        self.vocab_size = vocab_size
        self.token_bytes = token_bytes[:vocab_size]
        self.trie = _Trie()  # every token with bytes
        self.marked = _Trie()  # those holding a byte that can end or escape a string
        self.plain: list[int] = []  # the others: inside a string they keep it going, whatever the state
        for i, data in enumerate(self.token_bytes):
            if not data:
                continue
            self.trie.add(data, i)
            if any(b < 0x20 or b in (0x22, 0x5C) for b in data):
                self.marked.add(data, i)
            else:
                self.plain.append(i)

    @functools.cached_property
    def plain_by_chars(self) -> dict[int, list[int]]:
        """The plain tokens by how many characters they add to a string (UTF-8 lead bytes)."""
        out: dict[int, list[int]] = {}
        for i in self.plain:
            out.setdefault(sum(1 for b in self.token_bytes[i] if b & 0xC0 != 0x80), []).append(i)
        return out


class NoTokenError(RuntimeError):
    """No token of the vocabulary continues a grammar's state (one that cannot spell what the grammar asks for)."""


class TokenGrammar:
    """Token masks from a byte automaton: subclasses give `step` (state, byte -> state or None), `done`,
    `in_string` (plain bytes leave the state as it is: the walk takes every plain token at once) and
    `cache_key` (what of a state its mask depends on; a state of that key's own, for the walk)."""

    def __init__(self, vocab: Vocabulary | None = None):
        self.vocab = vocab  # None: bytes only (feed), no tokens
        self._masks: OrderedDict = OrderedDict()

    def step(self, s, b: int):
        raise NotImplementedError

    def done(self, s) -> bool:
        raise NotImplementedError

    def in_string(self, s) -> bool:
        return False

    def free(self, s) -> bool:
        """Whether the output is free text from s on (stop strings apply again)."""
        return False

    def cache_key(self, s):
        return s

    def advance(self, s, token: int):
        """The state after token `token`, or None where it cannot follow s."""
        data = self.vocab.token_bytes[token] if 0 <= token < len(self.vocab.token_bytes) else None
        return self.feed(s, data) if data else None

    def feed(self, s, data: bytes):
        """The state after these bytes, or None where they cannot follow s."""
        for b in data:
            if self.done(s):
                return None
            s = self.step(s, b)
            if s is None:
                return None
        return s

    def allowed(self, s) -> list[int]:
        """The token ids that may follow state s."""
        out: list[int] = []
        if self.in_string(s):
            out.extend(self.vocab.plain)
            self._walk(self.vocab.marked.root, s, out)
        elif not self.done(s):
            self._walk(self.vocab.trie.root, s, out)
        return out

    def _walk(self, root: list, s, out: list[int]) -> None:
        """Append the ids of every token under `root` whose bytes the automaton takes from state s."""
        todo = [(root, s)]
        while todo:
            node, state = todo.pop()
            for b, child in node[0].items():
                nxt = self.step(state, b)
                if nxt is None:
                    continue
                out.extend(child[1])
                if child[0] and not self.done(nxt):
                    todo.append((child, nxt))

    def mask(self, s, device):
        """A [vocab_size] bool tensor on `device`: the tokens that may follow s."""
        import torch

        key_state = self.cache_key(s)
        key = (key_state, str(device))
        cached = self._masks.get(key)
        if cached is not None:
            self._masks.move_to_end(key)
            return cached
        allowed = self.allowed(key_state)
        if not allowed:
            raise NoTokenError(f"constrained output: no token of this model's vocabulary can continue it (state {s})")
        mask = torch.zeros(self.vocab.vocab_size, dtype=torch.bool)
        mask[torch.tensor(allowed, dtype=torch.int64)] = True
        mask = mask.to(device)
        self._masks[key] = mask
        if len(self._masks) > MASK_CACHE:
            self._masks.popitem(last=False)
        return mask


class JsonGrammar(TokenGrammar):
    """Any JSON object (the automaton above)."""

    start = START_STATE

    def step(self, s: State, b: int) -> State | None:
        return step(s, b)

    def done(self, s: State) -> bool:
        return s.mode == DONE

    def in_string(self, s: State) -> bool:
        return s.mode == STR

    def cache_key(self, s: State) -> State:
        return key_state(s)


def key_state(s: State) -> State:
    """s with the containers below the top SEEN ones unknown: what the mask of s depends on."""
    if len(s.stack) <= SEEN:
        return s
    return s._replace(stack=UNKNOWN * (len(s.stack) - SEEN) + s.stack[-SEEN:])


class _Trie:
    """Token bytes as nested nodes: [children {byte: node}, token ids ending here]."""

    def __init__(self):
        self.root: list = [{}, []]

    def add(self, data: bytes, token: int) -> None:
        node = self.root
        for b in data:
            node = node[0].setdefault(b, [{}, []])
        node[1].append(token)


def advance(s: State, data: bytes) -> State | None:
    """JSON mode's state after these bytes, or None where they cannot continue."""
    return _BYTES.feed(s, data)


_BYTES = JsonGrammar()
