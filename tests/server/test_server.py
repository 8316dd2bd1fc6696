"""A live `punica serve` driven with the official openai client and httpx: completions, chat, streaming,
models, dynamic adapters, every error case, 64 concurrent streams over more adapters than slots,
disconnects, queue limits, a failing engine step, and /metrics."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import shutil
import threading
import time

import httpx
import openai
import pytest
from live_server import API_KEY, BASE
from prometheus_client.parser import text_string_to_metric_families

from punica import LLM, SamplingParams

ADAPTERS = ("a4", "b8", "c16", "d8")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def main(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def client(main):
    return openai.OpenAI(base_url=f"{main.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(servers):
    """Isolated runs: one request at a time through an in-process engine over the same files."""
    files = servers["files"]
    llm = LLM(model=files["model"], lora_modules=files["adapters"], device="cpu")

    @functools.cache
    def run(prompt: str, lora: str | None, max_tokens: int, stop_token_ids: tuple[int, ...] = ()) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop_token_ids)
        return llm.generate([prompt], params, lora=lora)[0].text

    return run


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(3, 128)}" for _ in range(n))


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(url: str, name: str, **labels) -> float:
    return scrape(url).get((name, frozenset(labels.items())), 0.0)


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_models_lists_base_and_adapters_with_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) >= {BASE, *ADAPTERS}
    assert models[BASE].parent is None
    assert all(models[a].parent == BASE for a in ADAPTERS)
    time.sleep(1.1)  # `created` is when the model came to be served, not when it was listed
    assert {m.id: m.created for m in client.models.list().data} == {m.id: m.created for m in models.values()}
    for name in (BASE, "a4"):  # GET /v1/models/{id}: one card, as listed
        assert client.models.retrieve(name).model_dump() == models[name].model_dump()
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        client.models.retrieve("nope")


@pytest.mark.parametrize("model", [BASE, "a4", "d8"])
def test_completion_matches_the_engine(client, reference, model):
    prompt = words(1, 6)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    lora = None if model == BASE else model
    assert out.choices[0].text == reference(prompt, lora, 8)
    assert out.model == model and out.object == "text_completion"
    assert out.usage.prompt_tokens == 6
    assert out.usage.total_tokens == 6 + out.usage.completion_tokens


def test_chat_uses_the_template_and_streams_the_same(client, reference):
    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w6 w7"}]
    out = client.chat.completions.create(model="b8", messages=messages, max_tokens=10, temperature=0)
    expected = reference("system w9 user w5 w6 w7 assistant", "b8", 10, stop_token_ids=(2,))
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == 7
    stream = client.chat.completions.create(model="b8", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason


@pytest.mark.parametrize("model", [BASE, "c16"])
def test_streamed_text_equals_non_streamed_greedy(client, model):
    prompt = words(2, 5)
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True)]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].text


def test_stop_strings_cut_streams_and_whole_alike(client):
    prompt = words(3, 4)
    full = client.completions.create(model="a4", prompt=prompt, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = " ".join(full.split()[3:5])
    kw = dict(model="a4", prompt=prompt, max_tokens=10, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert whole.finish_reason == "stop" and stop not in whole.text and full.startswith(whole.text)
    assert streamed == whole.text


def test_logprobs_whole_and_streamed(client, servers):
    """Completions' legacy logprobs and chat's per-token list carry the engine's numbers for every generated
    token, the same whole and streamed."""
    files = servers["files"]
    llm = LLM(model=files["model"], lora_modules=files["adapters"], device="cpu")
    prompt = words(11, 5)
    ref = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2),
                       lora="c16")[0]
    kw = dict(model="c16", prompt=prompt, max_tokens=6, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].logprobs
    assert whole.token_logprobs == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-5)
    text = llm.engine.tokenizer.token_text
    assert whole.tokens == [text(lp.token_id) for lp in ref.logprobs]
    assert whole.text_offset == [sum(map(len, whole.tokens[:i])) for i in range(6)]
    for top, lp in zip(whole.top_logprobs, ref.logprobs):  # the 2 most likely, and the chosen one
        assert top == pytest.approx({text(t): v for t, v in (*lp.top, (lp.token_id, lp.logprob))}, abs=1e-5)
    chunks = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True)]
    assert [t for c in chunks if c for t in c.token_logprobs] == whole.token_logprobs
    assert [t for c in chunks if c for t in c.text_offset] == whole.text_offset
    echo = client.completions.create(**{**kw, "echo": True})
    ref_prompt = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2,
                                                       prompt_logprobs=2), lora="c16")[0]
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text == prompt + ref.text and lp.tokens == [
        text(e.token_id) for e in (*ref_prompt.prompt_logprobs, *ref_prompt.logprobs)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == 5 + 6
    assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in (*ref_prompt.prompt_logprobs[1:],
                                                                        *ref_prompt.logprobs)], abs=1e-5)
    assert lp.token_logprobs[5:] == whole.token_logprobs
    echo_chunks = list(client.completions.create(**{**kw, "echo": True}, stream=True))
    assert "".join(c.choices[0].text for c in echo_chunks) == echo.choices[0].text
    assert [t for c in echo_chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    scored = client.completions.create(model="c16", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:5]
    assert scored.choices[0].finish_reason == "length"
    scored_chunks = list(client.completions.create(model="c16", prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                                                   stream=True))
    assert "".join(c.choices[0].text for c in scored_chunks) == prompt
    assert [t for c in scored_chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == \
        lp.token_logprobs[:5]
    assert client.completions.create(model="c16", prompt=prompt, max_tokens=0, echo=True).choices[0].logprobs is None
    plain_echo = client.completions.create(model="c16", prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert plain_echo.choices[0].text.startswith(prompt) and plain_echo.choices[0].logprobs is None
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model="c16", messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy: the top one
    assert all(c.bytes == list(c.token.encode()) for c in content)
    streamed = client.chat.completions.create(model="c16", messages=messages, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True)
    assert [c for ch in streamed if ch.choices and ch.choices[0].logprobs
            for c in ch.choices[0].logprobs.content] == content
    plain = client.chat.completions.create(model="c16", messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_logprob_formats_carry_no_infinity_and_continue_offsets():
    """A zero probability's -inf would make the body invalid JSON; a chunk's text_offset continues the last."""
    from punica import TokenLogprobs
    from punica.server.formats import ChatFormat, CompletionFormat
    entries = [TokenLogprobs(5, -0.5, ((5, -0.5), (6, float("-inf")))), TokenLogprobs(7, float("-inf"))]
    fmt = CompletionFormat("m", "id", lambda t: f"t{t}")
    first, second = fmt.logprobs(0, entries[:1]), fmt.logprobs(0, entries[1:])
    assert first["text_offset"] == [0] and second["text_offset"] == [2]
    assert fmt.logprobs(1, entries)["text_offset"] == [0, 2]  # each choice counts its own
    assert json.loads(json.dumps(second, allow_nan=False))["token_logprobs"] == [-9999.0]
    chat = ChatFormat("m", "id", lambda t: f"t{t}").logprobs(0, entries)
    assert json.loads(json.dumps(chat, allow_nan=False))["content"][0]["top_logprobs"][1]["logprob"] == -9999.0


def test_penalties_and_logit_bias_match_the_engine(client, servers):
    files = servers["files"]
    llm = LLM(model=files["model"], lora_modules=files["adapters"], device="cpu")
    prompt, texts = words(12, 4), set()
    for bias, presence, frequency, repetition in ((3.0, 2.0, 2.0, 1.0), (3.0, 0.0, 0.0, 1.0), (0.0, -1.0, 0.5, 1.0),
                                                  (0.0, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0, 2.0)):
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logit_bias={77: bias},
                                presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition)
        out = client.completions.create(model="b8", prompt=prompt, max_tokens=10, temperature=0,
                                        logit_bias={"77": bias}, presence_penalty=presence,
                                        frequency_penalty=frequency,
                                        extra_body={"ignore_eos": True, "repetition_penalty": repetition})
        assert out.choices[0].text == llm.generate([prompt], params, lora="b8")[0].text
        texts.add(out.choices[0].text)
    assert len(texts) == 5  # each setting changed the answer
    # min_p 1: only the most likely token survives, so a hot temperature still answers greedily
    hot = client.completions.create(model="b8", prompt=prompt, max_tokens=10, temperature=5.0, seed=3,
                                    extra_body={"ignore_eos": True, "min_p": 1.0})
    assert hot.choices[0].text == llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0,
                                                                        ignore_eos=True), lora="b8")[0].text


def test_min_tokens_and_include_stop_str_in_output_through_extra_body(client):
    """vLLM's min_tokens and include_stop_str_in_output, as the openai client sends them (extra_body), whole and
    streamed: a stop string ("w77", forced every draw by logit_bias) is looked for from draw min_tokens on."""
    kw = dict(model="a4", prompt="w5 w6", max_tokens=6, temperature=0, stop=["w77"], logit_bias={"77": 100})
    assert client.completions.create(**kw).choices[0].text == ""
    late = client.completions.create(**kw, extra_body={"min_tokens": 2}).choices[0]
    assert (late.text, late.finish_reason) == ("w77 ", "stop")
    kept = dict(kw, extra_body={"min_tokens": 2, "include_stop_str_in_output": True})
    assert client.completions.create(**kept).choices[0].text == "w77 w77"
    assert "".join(c.choices[0].text for c in client.completions.create(**kept, stream=True)) == "w77 w77"
    with pytest.raises(openai.BadRequestError, match="min_tokens must be an integer from 0 to max_tokens"):
        client.completions.create(**kw, extra_body={"min_tokens": 7})


def test_truncate_prompt_tokens_keeps_the_prompts_end(client):
    """vLLM's truncate_prompt_tokens: only the prompt's last k tokens are read (and echoed, and counted), also for
    a prompt longer than the context, which is otherwise refused; chat prompts are cut after the template."""
    long = words(31, 3000)
    kw = dict(model="a4", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError, match="more than"):
        client.completions.create(prompt=long, **kw)
    cut = client.completions.create(prompt=long, **{**kw, "extra_body": {"ignore_eos": True,
                                                                          "truncate_prompt_tokens": 4}})
    tail = " ".join(long.split()[-4:])
    assert cut.usage.prompt_tokens == 4
    assert cut.choices[0].text == client.completions.create(prompt=tail, **kw).choices[0].text
    echoed = client.completions.create(prompt=long, echo=True, **{**kw, "extra_body": {"truncate_prompt_tokens": 4}})
    assert echoed.choices[0].text.startswith(tail)
    chat = client.chat.completions.create(model="a4", messages=[{"role": "user", "content": long}], max_tokens=2,
                                          extra_body={"truncate_prompt_tokens": 6})
    assert chat.usage.prompt_tokens == 6


def test_n_choices_seeds_and_prompt_lists(client):
    kw = dict(model="b8", prompt=words(4, 5), max_tokens=8, temperature=1.0, seed=7, n=3)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    two = client.completions.create(model=BASE, prompt=[words(5, 3), words(6, 4)], max_tokens=4, temperature=0, n=2)
    texts = [c.text for c in sorted(two.choices, key=lambda c: c.index)]
    assert texts[0] == texts[1] and texts[2] == texts[3] and two.usage.prompt_tokens == 7


def test_usage_counts_prompt_tokens_read_from_the_prefix_cache(client):
    """usage.prompt_tokens_details.cached_tokens: 0 for a new prompt, although its second choice read the first's
    blocks (the prompt was computed once); the prompt's full 16-token blocks when it is sent again; in a
    stream's usage chunk too."""
    kw = dict(model="a4", prompt=words(71, 40), max_tokens=3, temperature=0)
    first = client.completions.create(n=2, **kw)
    assert first.usage.prompt_tokens == 40 and first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(n=2, **kw)
    assert again.usage.prompt_tokens_details.cached_tokens == 32
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 32
    other = client.completions.create(**{**kw, "model": "b8"})  # another adapter's KV: nothing shared
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_tokenize_and_detokenize_see_what_the_completion_routes_see(main, client):
    """/tokenize counts a prompt, or a conversation through the chat template, as the completion routes do;
    /detokenize gives the text back; bad input is a 400 naming it, an unknown model a 404, no key a 401."""
    post = lambda path, body, headers=AUTH: httpx.post(f"{main.url}/{path}", json=body, headers=headers, timeout=30)
    prompt = words(81, 9)
    counted = post("tokenize", {"model": "a4", "prompt": prompt}).json()
    done = client.completions.create(model="a4", prompt=prompt, max_tokens=1)
    assert counted["count"] == len(counted["tokens"]) == done.usage.prompt_tokens
    assert counted["max_model_len"] == 256
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]
    chat_count = post("tokenize", {"messages": messages}).json()["count"]
    chat = client.chat.completions.create(model=BASE, messages=messages, max_tokens=1)
    assert chat_count == chat.usage.prompt_tokens > counted["count"]
    bare = post("tokenize", {"prompt": prompt, "add_special_tokens": False}).json()["tokens"]
    assert post("detokenize", {"model": BASE, "tokens": bare}).json() == {"prompt": prompt}
    assert_openai_error(post("tokenize", {"prompt": prompt, "messages": messages}), 400, "exactly one")
    assert_openai_error(post("tokenize", {"model": "nope", "prompt": prompt}), 404, "'nope' does not exist")
    assert_openai_error(post("detokenize", {"tokens": [1, 10 ** 6]}), 400, "token ids must be in", "1000000")
    assert post("tokenize", {"prompt": prompt}, headers={}).status_code == 401


def assert_openai_error(resp: httpx.Response, status: int, *fragments: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in err["message"], err["message"]
    return err


def test_request_errors_have_openai_shape(main, client):
    post = lambda body, headers=AUTH: httpx.post(f"{main.url}/v1/completions", json=body, headers=headers)
    ok = {"model": BASE, "prompt": "w5 w6", "max_tokens": 4}
    assert post(ok).status_code == 200
    assert assert_openai_error(post({**ok, "model": "nope"}), 404, "nope")["code"] == "model_not_found"
    assert_openai_error(post({**ok, "temperature": -1}), 400, "temperature")
    assert_openai_error(post({**ok, "top_p": 0}), 400, "top_p")
    assert assert_openai_error(post({**ok, "n": 0}), 400, "n")["param"] == "n"
    raw = lambda content, kind: httpx.post(f"{main.url}/v1/completions", content=content,
                                           headers={**AUTH, "Content-Type": kind})
    assert_openai_error(raw(b'{"model": "m", "prompt": ', "application/json"), 400, "not valid JSON")
    assert_openai_error(raw(b"model=m&prompt=x", "text/plain"), 400, "JSON object", "Content-Type")
    assert_openai_error(post({**ok, "prompt": words(7, 300)}), 400, "max_model_len")
    assert_openai_error(post({**ok, "max_tokens": 1000}), 400, "max_tokens")
    assert_openai_error(post({**ok, "logprobs": 21}), 400, "logprobs")
    assert_openai_error(post({**ok, "suffix": "w9"}), 400, "suffix")
    assert_openai_error(post({**ok, "logit_bias": {"w5": 1}}), 400, "logit_bias")
    assert_openai_error(post({**ok, "logit_bias": {"500": 1}}), 400, "logit_bias")  # the test vocabulary has 128
    assert_openai_error(post({**ok, "logit_bias": {"5": -101}}), 400, "logit_bias")
    forced = post({**ok, "temperature": 0, "logit_bias": {"77": 100}, "ignore_eos": True})
    assert forced.json()["choices"][0]["text"].split() == ["w77"] * 4
    assert_openai_error(post({**ok, "presence_penalty": 2.5}), 400, "presence_penalty")
    assert_openai_error(post({**ok, "frequency_penalty": -3}), 400, "frequency_penalty")
    assert_openai_error(post({**ok, "repetition_penalty": 0}), 400, "repetition_penalty")
    assert_openai_error(post({**ok, "min_p": 1.5}), 400, "min_p")
    assert_openai_error(post({**ok, "max_tokens": 0}), 400, "max_tokens")  # 0 only with echo (scores only)
    assert_openai_error(post({**ok, "top_logprobs": 2}), 400, "top_logprobs")
    chat = {"model": BASE, "messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2}
    assert_openai_error(httpx.post(f"{main.url}/v1/chat/completions", json=chat, headers=AUTH), 400, "logprobs")
    assert_openai_error(post({"prompt": "w5"}), 400, "model")
    assert_openai_error(post(ok, headers={}), 401, "API key")
    assert_openai_error(post(ok, headers={"Authorization": "Bearer wrong"}), 401, "API key")
    assert_openai_error(httpx.get(f"{main.url}/v1/nowhere", headers=AUTH), 404, "Not Found")
    assert_openai_error(httpx.get(f"{main.url}/v1/completions", headers=AUTH), 405)
    chat = httpx.post(f"{main.url}/v1/chat/completions", json={"model": BASE, "messages": []}, headers=AUTH)
    assert_openai_error(chat, 400, "messages")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="w5", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{main.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_null_max_tokens_and_chat_message_checks(main):
    """`"max_tokens": null` on /v1/completions is the default 16 (it ran to the end of the context); a chat
    message needs one of OpenAI's roles, and content unless it is the assistant's."""
    post = lambda body, path: httpx.post(f"{main.url}/v1/{path}", json=body, headers=AUTH, timeout=60)
    done = post({"model": BASE, "prompt": "w5 w6", "max_tokens": None, "ignore_eos": True}, "completions")
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 16
    user = {"role": "user", "content": "w5 w6"}
    chat = lambda *messages: post({"model": BASE, "messages": list(messages), "max_tokens": 2}, "chat/completions")
    assert_openai_error(chat({"role": "wizard", "content": "w5"}), 400, "role", "assistant")
    assert_openai_error(chat({"role": "user", "content": None}), 400, "content", "'user'")
    assert_openai_error(chat({"role": "system", "content": None}, user), 400, "content", "'system'")
    assert chat({"role": "system", "content": "be brief"}, user, {"role": "assistant", "content": None},
                user).status_code == 200


def test_bad_inputs_are_refused_up_front_and_others_keep_running(main, client):
    """Inputs that used to fail deep in the engine or tokenizer (a seed out of torch's range, a lone UTF-16
    surrogate, a prompt far past the context) get a 400 naming the cause, quickly, and a request running
    meanwhile finishes untouched."""
    post = lambda body, path="completions": httpx.post(f"{main.url}/v1/{path}", json=body, headers=AUTH, timeout=60)
    ok = {"model": BASE, "prompt": "w5 w6", "max_tokens": 4}
    stream = client.completions.create(model="a4", prompt=words(10, 4), max_tokens=40, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    assert_openai_error(post({**ok, "seed": 10 ** 23}), 400, "seed")
    assert_openai_error(post({**ok, "seed": -2 ** 64}), 400, "seed")
    top = post({**ok, "seed": 2 ** 64 - 1, "n": 2, "temperature": 1.0})  # choice 1's seed wraps to 0
    assert top.status_code == 200 and len(top.json()["choices"]) == 2
    surrogate = httpx.post(f"{main.url}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                           content='{"model": "%s", "prompt": "a \\udfff b", "max_tokens": 2}' % BASE)
    assert_openai_error(surrogate, 400, "surrogate")
    chat = {"model": BASE, "messages": [{"role": "user", "content": "a \udfff"}]}
    chat = httpx.post(f"{main.url}/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                      content=json.dumps(chat))  # ASCII with a \\u escape: httpx's json= cannot encode it
    assert_openai_error(chat, 400, "surrogate")
    started = time.monotonic()
    assert_openai_error(post({**ok, "prompt": "w5 " * 400_000}), 400, "characters", "max_model_len")
    assert time.monotonic() - started < 10  # refused by its length, not after tokenizing 800k words
    assert_openai_error(post({**ok, "response_format": {"type": "xml"}}), 400, "response_format", "json_schema")
    # constrained output needs the bytes of each token: this model's word-level tokenizer has none
    for constrained in ({"response_format": {"type": "json_object"}}, {"guided_choice": ["a"]}):
        assert_openai_error(post({**ok, **constrained}), 400, "constrained output", "byte-level")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    free = post({"model": BASE, "messages": [{"role": "user", "content": "w5"}], "tools": tools, "max_tokens": 3},
                "chat/completions")  # "auto" replies are held to valid calls only where the bytes are known
    assert free.status_code == 200 and free.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert_openai_error(post({**ok, "tool_choice": "auto"}, "chat/completions"), 400)
    for field, value in (("max_tokens", "3"), ("n", True), ("temperature", "0.5"), ("stream", "yes")):
        assert_openai_error(post({**ok, field: value}), 400, field)  # no silent coercion of the wrong type
    assert post({**ok, "temperature": 1}).status_code == 200  # an integer is a number
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    assert len((first.choices[0].text + "".join(c.choices[0].text for c in rest)).split()) == 40
    assert httpx.get(f"{main.url}/health").status_code == 200


def test_load_and_unload_adapters(main, client, servers):
    allowed, adapters = servers["files"]["allowed"], servers["files"]["adapters"]
    load = lambda name, path, headers=AUTH: httpx.post(f"{main.url}/v1/load_lora_adapter", headers=headers,
                                                       json={"lora_name": name, "lora_path": path})
    assert load("dyn", os.path.join(allowed, "copy-a4")).status_code == 200
    assert any(m.id == "dyn" and m.parent == BASE for m in client.models.list().data)
    same = [client.completions.create(model=m, prompt=words(8, 5), max_tokens=8, temperature=0).choices[0].text
            for m in ("dyn", "a4")]
    assert same[0] == same[1]
    assert_openai_error(load("dyn", os.path.join(allowed, "copy-c16")), 400, "already registered")
    assert_openai_error(load("x", adapters["b8"]), 403, "outside the allowed")
    assert_openai_error(load("x", os.path.join(allowed, "..", "..")), 403, "outside the allowed")
    for linked in ("adapter_model.safetensors", "adapter_config.json"):  # a real directory, a file linked outside
        inner = os.path.join(allowed, f"links-{linked}")
        shutil.copytree(adapters["b8"], inner)
        os.remove(os.path.join(inner, linked))
        os.symlink(os.path.join(adapters["b8"], linked), os.path.join(inner, linked))
        assert_openai_error(load("x", inner), 403, linked, "links outside the allowed")
    assert_openai_error(load("x", os.path.join(allowed, "dora")), 400, "use_dora")
    assert_openai_error(load("x", os.path.join(allowed, "missing")), 400, "missing")
    assert_openai_error(load(BASE, os.path.join(allowed, "copy-c16")), 400, "base model")
    assert_openai_error(load("x", os.path.join(allowed, "copy-c16"), headers={}), 401)
    assert_openai_error(load("x", os.path.join(allowed, "copy-c16") + "\0"), 400, "NUL")
    assert_openai_error(load("x\ty", os.path.join(allowed, "copy-c16")), 400, "printable")
    unload = lambda name: httpx.post(f"{main.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=AUTH)
    assert_openai_error(unload("never-loaded"), 404, "never-loaded")
    assert httpx.get(f"{main.url}/health").status_code == 200


def test_unload_in_use_lets_in_flight_requests_finish(main, client, servers):
    allowed = servers["files"]["allowed"]
    httpx.post(f"{main.url}/v1/load_lora_adapter", headers=AUTH,
               json={"lora_name": "busy", "lora_path": os.path.join(allowed, "copy-c16")}).raise_for_status()
    stream = client.completions.create(model="busy", prompt=words(9, 4), max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    resp = httpx.post(f"{main.url}/v1/unload_lora_adapter", json={"lora_name": "busy"}, headers=AUTH)
    assert resp.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="busy", prompt="w5", max_tokens=2)
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    assert len((first.choices[0].text + "".join(c.choices[0].text for c in rest)).split()) == 200


async def one_stream(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> str:
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True)
    return "".join([c.choices[0].text async for c in stream])


def test_64_concurrent_streams_over_more_adapters_than_slots(main, reference):
    models = [BASE, *ADAPTERS]  # 4 adapters, 2 device slots
    from punica.workload import adapter_indices

    picks = [models[i] for i in adapter_indices("uniform", 64, len(models), seed=1)]
    jobs = [(m, words(100 + i % 8, 3 + i % 8), 3 + i % 4) for i, m in enumerate(picks)]  # isolated runs cached
    evictions = metric(main.url, "punica_adapter_device_evictions_total")

    async def run_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{main.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(one_stream(client, *job) for job in jobs))

    texts = asyncio.run(run_all())
    for (model, prompt, max_tokens), text in zip(jobs, texts):
        assert text == reference(prompt, None if model == BASE else model, max_tokens), (model, prompt)
    assert metric(main.url, "punica_adapter_device_evictions_total") > evictions
    assert metric(main.url, "punica_num_requests_running") == 0


def test_disconnect_mid_stream_frees_kv_and_slot(main):
    aborted = metric(main.url, "punica_request_finished_total", model="a4", reason="abort")
    tokens = metric(main.url, "punica_generation_tokens_total", model="a4")
    body = {"model": "a4", "prompt": words(10, 4), "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{main.url}/v1/completions", json=body, headers=AUTH, timeout=30) as resp:
        events = (line for line in resp.iter_lines() if line.startswith("data: "))
        next(events), next(events), next(events)
        assert metric(main.url, "punica_num_requests_running") == 1
        assert metric(main.url, "punica_kv_cache_usage_ratio") > 0
    wait_for(lambda: metric(main.url, "punica_num_requests_running") == 0, what="the aborted request to leave")
    assert metric(main.url, "punica_kv_cache_usage_ratio") == 0
    assert metric(main.url, "punica_request_finished_total", model="a4", reason="abort") == aborted + 1
    assert metric(main.url, "punica_generation_tokens_total", model="a4") - tokens < 240  # it never ran to the end


def test_metrics_parse_and_carry_per_adapter_series(main, client):
    client.completions.create(model="d8", prompt="w5 w6", max_tokens=3, temperature=0)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{main.url}/metrics").text)}
    for name in ("punica_http_requests", "punica_requests", "punica_request_finished", "punica_prompt_tokens",
                 "punica_generation_tokens", "punica_num_requests_running", "punica_num_requests_waiting",
                 "punica_kv_cache_usage_ratio", "punica_adapter_device_loads", "punica_adapter_device_evictions"):
        assert name in families, name
    assert families["punica_time_to_first_token_seconds"].type == "histogram"
    assert families["punica_time_per_output_token_seconds"].type == "histogram"
    assert metric(main.url, "punica_requests_total", model="d8") >= 1
    assert metric(main.url, "punica_generation_tokens_total", model="d8") >= 3
    assert metric(main.url, "punica_http_requests_total", route="/v1/completions", status="404") >= 1
    # a prompt sent twice: the second takes its full blocks (two of 16 tokens) from the prefix cache
    hits = lambda: metric(main.url, "punica_prefix_cache_hits_total")
    before, prompt = hits(), words(31, 40)
    answers = {client.completions.create(model="d8", prompt=prompt, max_tokens=4, temperature=0).choices[0].text
               for _ in range(2)}
    assert hits() - before == 32 and len(answers) == 1
    assert metric(main.url, "punica_prefix_cache_queries_total") >= hits()
    assert ("punica_prefix_cache_evictions_total", frozenset()) in scrape(main.url)  # exported (none here)


# the small server: one running request, one waiting, one adapter slot, one CPU-cached adapter

def small_post(small, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{small.url}/v1/completions", json={"model": BASE, "temperature": 0, **body}, **kw)


def test_queue_full_is_503_with_retry_after_and_waiting_disconnect_aborts(servers):
    small = servers["small"]
    body = {"model": BASE, "prompt": "w5 w6", "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    aborted = lambda: metric(small.url, "punica_request_finished_total", model=BASE, reason="abort")
    before = aborted()
    with httpx.stream("POST", f"{small.url}/v1/completions", json=body, timeout=30) as running:
        lines = running.iter_lines()  # keep a reference: closing this iterator closes the connection
        assert next(lines).startswith("data: ")
        with pytest.raises(httpx.ReadTimeout):  # waits behind the running one, then the client gives up
            small_post(small, {"prompt": "w7", "max_tokens": 2}, timeout=0.5)
        wait_for(lambda: aborted() == before + 1, what="the waiting request's abort")
        assert metric(small.url, "punica_num_requests_waiting") == 0
        waiter = threading.Thread(target=small_post, args=(small, {"prompt": "w7", "max_tokens": 2}))
        waiter.start()
        wait_for(lambda: metric(small.url, "punica_num_requests_waiting") == 1, what="a waiting request")
        full = small_post(small, {"prompt": "w8", "max_tokens": 2})
        assert_openai_error(full, 503, "waiting")
        assert full.headers["retry-after"] == "1"
        big = small_post(small, {"prompt": "w8 " * 40_000, "max_tokens": 2})  # 120 kB, max_request_bytes 100 kB
        assert assert_openai_error(big, 413, "max_request_bytes")["code"] == "request_too_large"
        never = small_post(small, {"prompt": "w8", "max_tokens": 2, "n": 2})  # 2 sequences, max_waiting 1
        assert "retry-after" not in never.headers
        assert_openai_error(never, 400, "max_waiting")
    waiter.join(30)
    assert not waiter.is_alive()


def test_failing_adapter_read_fails_its_request_and_the_server_lives(servers, reference):
    small, allowed = servers["small"], servers["files"]["small_allowed"]
    load = lambda name: httpx.post(f"{small.url}/v1/load_lora_adapter",
                                   json={"lora_name": name, "lora_path": os.path.join(allowed, name)})
    assert load("a4").status_code == 200 and load("b8").status_code == 200  # a4 leaves the 1-adapter CPU cache
    shutil.move(os.path.join(allowed, "a4"), os.path.join(allowed, "a4-gone"))  # its next read fails
    try:
        assert_openai_error(small_post(small, {"model": "a4", "prompt": "w5", "max_tokens": 2}), 500,
                            "'a4' could not be read", "does not exist")
    finally:
        shutil.move(os.path.join(allowed, "a4-gone"), os.path.join(allowed, "a4"))
    assert small_post(small, {"prompt": "w5", "max_tokens": 2}).status_code == 200
    again = small_post(small, {"model": "a4", "prompt": "w5 w6", "max_tokens": 4})  # its files are back
    assert again.json()["choices"][0]["text"] == reference("w5 w6", "a4", 4)  # not an empty slot's output
    assert small_post(small, {"model": "b8", "prompt": "w5", "max_tokens": 2}).status_code == 200
    assert metric(small.url, "punica_engine_step_errors_total") == 0  # only that request failed
    assert httpx.get(f"{small.url}/health").status_code == 200


def test_a_dynamic_adapter_whose_file_became_a_link_outside_is_refused_when_read_again(servers):
    """A dynamic load's files are checked again whenever they are read back into memory: a weights file
    swapped for a link out of --allowed-lora-dir after the load fails that adapter's request, not the server."""
    small, allowed, outside = servers["small"], servers["files"]["small_allowed"], servers["files"]["adapters"]
    load = lambda name, path: httpx.post(f"{small.url}/v1/load_lora_adapter",
                                         json={"lora_name": name, "lora_path": os.path.join(allowed, path)})
    assert load("c16-linked", "c16").status_code == 200
    assert load("b8-evicts", "b8").status_code == 200  # c16-linked leaves the 1-adapter CPU cache
    weights = os.path.join(allowed, "c16", "adapter_model.safetensors")
    os.rename(weights, weights + ".moved")
    os.symlink(os.path.join(outside["c16"], "adapter_model.safetensors"), weights)
    try:
        assert_openai_error(small_post(small, {"model": "c16-linked", "prompt": "w5", "max_tokens": 2}), 500,
                            "'c16-linked' could not be read", "links outside the allowed")
    finally:
        os.remove(weights)
        os.rename(weights + ".moved", weights)
    assert small_post(small, {"model": "c16-linked", "prompt": "w5", "max_tokens": 2}).status_code == 200
    assert httpx.get(f"{small.url}/health").status_code == 200
