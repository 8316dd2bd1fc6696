"""`--reasoning-parser` (vLLM's `reasoning_content`) through the official openai client, in process: a reply's
<think> block goes to `message.reasoning_content` and, streamed, to `delta.reasoning_content`, the rest to
`content`. The tiny random model is held to replies with and without such a block by `guided_regex`."""

from __future__ import annotations

import pytest
from inprocess import openai_client

from punica.config import ServerConfig
from punica.errors import ConfigError

ASK = [{"role": "user", "content": "Well?"}]
THINKS = r"<think>[a-z]{1,6} [a-z]{1,6}</think>\n\n[a-z]{1,8}"  # qwen3: the reply opens the block itself
CLOSES = r"[a-z]{1,6}</think>\n\n[a-z]{1,8}"  # deepseek_r1: the template opened it


@pytest.fixture(scope="module", params=[None, "qwen3", "deepseek_r1"])
def client(request, tiny_models, tmp_path_factory):
    _, model_dir, adapters = tiny_models["llama"]
    with openai_client(model_dir, adapters, tmp_path_factory.mktemp("reasoning"),
                       server=ServerConfig(reasoning_parser=request.param)) as c:
        c.parser = request.param
        yield c


def whole_and_streamed(client, regex: str, n: int = 3):
    """Each choice's (reasoning, content), whole and streamed (the deltas joined; None where none came)."""
    kwargs = dict(model="tiny", messages=ASK, max_tokens=40, seed=4, temperature=1.0, n=n,
                  extra_body={"guided_regex": regex})
    reply = client.chat.completions.create(**kwargs)
    whole = [(getattr(c.message, "reasoning_content", None), c.message.content) for c in reply.choices]
    parts = [[None, ""] for _ in range(n)]
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            piece = getattr(c.delta, "reasoning_content", None)
            if piece:
                parts[c.index][0] = (parts[c.index][0] or "") + piece
            parts[c.index][1] += c.delta.content or ""
    assert all(c.finish_reason == "stop" for c in reply.choices)
    return whole, [tuple(p) for p in parts]


def test_a_think_block_goes_to_reasoning_content(client):
    whole, streamed = whole_and_streamed(client, THINKS if client.parser != "deepseek_r1" else CLOSES)
    assert streamed == whole
    for reasoning, content in whole:
        if client.parser is None:  # no parser: the reply as written
            assert reasoning is None and "</think>\n\n" in content
        else:
            words = 2 if client.parser == "qwen3" else 1  # what each regex writes inside the block
            assert len(reasoning.split(" ")) == words and all(w.isalpha() for w in reasoning.split(" "))
            assert content.isalpha(), (reasoning, content)


def test_a_reply_without_a_block(client):
    whole, streamed = whole_and_streamed(client, r"[a-z]{1,8} [a-z]{1,8}", n=2)
    assert streamed == whole
    for reasoning, content in whole:
        if client.parser == "deepseek_r1":  # reasoning until </think>, which never came
            assert content == "" and " " in reasoning
        else:
            assert reasoning is None and " " in content


def test_unknown_parsers_are_refused():
    with pytest.raises(ConfigError, match="reasoning_parser must be one of qwen3, deepseek_r1, got 'r2'"):
        ServerConfig(reasoning_parser="r2")
