"""Regex and choice mode through the official openai client, in process (vLLM's `guided_regex` and
`guided_choice`, sent in `extra_body`): a tiny random model with a byte-level tokenizer writes exactly one of the
choices, or text the whole of which matches the pattern, streamed or whole alike; what cannot be served is
refused by name."""

from __future__ import annotations

import re

import openai
import pytest
from inprocess import openai_client

CHOICES = ["yes", "no", "yes, surely", "née"]


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    _, model_dir, adapters = tiny_models["llama"]
    with openai_client(model_dir, adapters, tmp_path_factory.mktemp("guided")) as c:
        yield c


def test_choices_are_written_whole(client):
    reply = client.completions.create(model="tiny", prompt="Answer:", max_tokens=20, n=6, seed=3, temperature=1.0,
                                      extra_body={"guided_choice": CHOICES})
    texts = [c.text for c in reply.choices]
    assert all(t in CHOICES for t in texts), texts
    assert all(c.finish_reason == "stop" for c in reply.choices)
    assert len(set(texts)) > 1, texts  # temperature 1: the seeds pick different ones


def test_regex_matches_the_whole_reply_streamed_or_not(client):
    body = {"guided_regex": r"[A-Z]{2}-\d{3}( [a-z]+)?"}
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "A code?"}], max_tokens=24, seed=5,
                  temperature=1.0, n=3, extra_body=body)
    whole = client.chat.completions.create(**kwargs)
    for choice in whole.choices:
        text = choice.message.content
        if choice.finish_reason == "stop":
            assert re.fullmatch(r"[A-Z]{2}-\d{3}( [a-z]+)?", text), text
        else:
            assert choice.finish_reason == "length" and re.fullmatch(r"[A-Z]{2}-\d{3} [a-z]+", text), text
    streamed = [""] * 3
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == [c.message.content for c in whole.choices]


@pytest.mark.parametrize("body, fragments", [
    ({"guided_regex": "(ab"}, ["regex", "an unclosed group"]),
    ({"guided_regex": r"(a)\1"}, ["backreferences"]),
    ({"guided_choice": []}, ["choice must be a non-empty list"]),
    ({"guided_choice": ["a"], "guided_regex": "a"}, ["regex and choice exclude each other"]),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, ["guided_regex", "response_format"]),
])
def test_what_cannot_be_served_is_refused_by_name(client, body, fragments):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body=body)
    assert all(f in str(err.value) for f in fragments), str(err.value)
