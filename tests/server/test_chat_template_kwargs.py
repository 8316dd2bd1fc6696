"""`chat_template_kwargs` (vLLM's field; Qwen3 reads `enable_thinking` from it) through the official openai client,
in process: the variables reach the chat template, and names the server sets itself are refused by name."""

from __future__ import annotations

import openai
import pytest
from inprocess import openai_client

# Qwen3's switch, reduced: with enable_thinking false the assistant's turn opens with an empty think block
THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
            "{% endif %}")
EMPTY_THINK = "<think>\n\n</think>\n\n"
ASK = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    _, model_dir, adapters = tiny_models["llama"]
    with openai_client(model_dir, adapters, tmp_path_factory.mktemp("kwargs"), chat_template=THINKING) as c:
        yield c


def prompt_tokens(client, **extra) -> int:
    reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=1, extra_body=extra or None)
    return reply.usage.prompt_tokens


def test_template_variables_reach_the_template(client):
    plain = prompt_tokens(client)
    assert prompt_tokens(client, chat_template_kwargs={"enable_thinking": False}) == plain + len(EMPTY_THINK)
    assert prompt_tokens(client, chat_template_kwargs={"enable_thinking": True}) == plain  # a byte a token
    assert prompt_tokens(client, chat_template_kwargs={}) == plain


def test_the_tokenize_route_renders_them_too(client):
    def tokens(**extra):
        return client.post("/../tokenize", cast_to=object, body={"model": "tiny", "messages": ASK, **extra})["tokens"]

    plain, off = tokens(), tokens(chat_template_kwargs={"enable_thinking": False})
    assert off[:len(plain)] == plain
    assert client.post("/../detokenize", cast_to=object, body={"tokens": off[len(plain):]})["prompt"] == EMPTY_THINK


@pytest.mark.parametrize("kwargs, fragment", [
    ({"messages": []}, "chat_template_kwargs may not set messages"),
    ({"add_generation_prompt": False, "tools": []}, "may not set add_generation_prompt, tools"),
    ({"not-a-name": 1}, "chat_template_kwargs must map variable names to values"),
])
def test_names_the_server_sets_are_refused(client, kwargs, fragment):
    with pytest.raises(openai.BadRequestError, match=fragment):
        prompt_tokens(client, chat_template_kwargs=kwargs)
