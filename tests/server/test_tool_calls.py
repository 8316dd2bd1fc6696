"""Tool calls through the official openai client, in process (Starlette's TestClient as its HTTP client): a
tiny random model with a byte-level tokenizer writes a call of the named tool, or of one of several, whose
arguments follow the tool's schema; streamed calls arrive as OpenAI's deltas; the functions and earlier calls
reach the prompt; under "auto", calls are read out of free replies in three shapes, streamed or whole alike;
what is not served is refused by name."""

from __future__ import annotations

import json

import openai
import pytest
from inprocess import CHATML, openai_client

from punica.server import tool_prompt
from punica.server.formats import AutoToolFormat

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string", "maxLength": 12}, "limit": {"type": "integer"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    _, model_dir, adapters = tiny_models["llama"]
    with openai_client(model_dir, adapters, tmp_path_factory.mktemp("tools"), max_model_len=2048) as c:
        yield c


def chat(client, **kwargs):
    return client.chat.completions.create(**{"model": "tiny", "messages": ASK, "max_tokens": 60, "temperature": 1.0,
                                             **kwargs})


def test_a_named_tool_is_called_with_arguments_of_its_schema(client):
    reply = chat(client, tools=[WEATHER, SEARCH], seed=1, n=3,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for choice in reply.choices:
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        if choice.finish_reason == "tool_calls":  # else cut by max_tokens: a prefix of the arguments
            args = json.loads(call.function.arguments)
            assert list(args) == ["city", "unit"] and args["unit"] in ("C", "F") and len(args["city"]) <= 12
        else:
            assert choice.finish_reason == "length"
    assert len({c.message.tool_calls[0].id for c in reply.choices}) == 3
    assert any(c.finish_reason == "tool_calls" for c in reply.choices)


def test_required_calls_one_of_the_tools(client):
    names = set()
    for seed in range(4):
        reply = chat(client, tools=[WEATHER, SEARCH], tool_choice="required", seed=seed)
        choice = reply.choices[0]
        call = choice.message.tool_calls[0]
        assert call.function.name in ("get_weather", "search")
        names.add(call.function.name)
        if choice.finish_reason == "tool_calls":
            args = json.loads(call.function.arguments)
            assert list(args) == (["city", "unit"] if call.function.name == "get_weather" else ["query", "limit"])
    assert names  # which ones a random model picks is up to it


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "search"}}])
def test_streamed_calls_equal_the_whole_ones(client, tool_choice):
    kwargs = dict(tools=[WEATHER, SEARCH], tool_choice=tool_choice, seed=7, temperature=0.0)
    whole = chat(client, **kwargs).choices[0]
    chunks = list(chat(client, stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first = deltas[0].tool_calls[0]
    call = whole.message.tool_calls[0]
    assert (first.index, first.type, first.function.name) == (0, "function", call.function.name)
    assert first.id.startswith("call_") and chunks[0].id.removeprefix("chatcmpl-") in first.id
    assert "".join(d.tool_calls[0].function.arguments or "" for d in deltas) == call.function.arguments
    assert all(d.tool_calls[0].function.name is None for d in deltas[1:])
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_tools_and_earlier_calls_reach_the_prompt():
    """Templates without tool support get the offer in the system turn and past calls written out as the
    model writes them; a template of its own gets `tools` (tool_prompt.takes_tools)."""
    fn = WEATHER["function"]
    history = [{"role": "user", "content": "Oslo?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
               {"role": "tool", "content": "-3 C", "tool_call_id": "call_1"}]
    turns = tool_prompt.with_tools(history, [fn], None)
    assert turns[0]["role"] == "system" and json.dumps(fn["parameters"]) in turns[0]["content"]
    assert "reply with its name, a space" in turns[0]["content"]
    assert turns[2]["content"] == 'get_weather {"city": "Oslo", "unit": "C"}' and turns[3]["content"] == "-3 C"
    forced = tool_prompt.with_tools([{"role": "system", "content": "Be brief."}, *history], [fn], "get_weather")
    assert forced[0]["content"].startswith("Be brief.\n\n") and "Call get_weather now" in forced[0]["content"]
    assert not tool_prompt.takes_tools(CHATML)
    assert tool_prompt.takes_tools("{% if tools %}{{ tools | tojson }}{% endif %}{{ m.tool_calls }}")


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(tool_choice="required"), ["tool_choice needs tools"]),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), ["'nope'", "get_weather"]),
    (dict(tools=[WEATHER], tool_choice="sometimes"), ["tool_choice must be"]),
    (dict(tools=[{"type": "retrieval"}], tool_choice="required"), ["tools[0]"]),
    (dict(tools=[WEATHER, WEATHER], tool_choice="required"), ["two tools are named 'get_weather'"]),
    (dict(tools=[{"type": "function", "function": {"name": "a b"}}], tool_choice="required"), ["tools[0]", "name"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "pattern": "(x)\\1"}}}}}], tool_choice="required"),
     ["pattern", "backreferences"]),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), ["response_format"]),
])
def test_tool_requests_not_served_are_refused_by_name(client, kwargs, fragments):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_tool_choice_none_replies_in_text(client):
    reply = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=5, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content is not None


NAMES = ["get_weather", "search"]
ARGS = '{"city": "Oslo", "unit": "C"}'


@pytest.mark.parametrize("text, calls", [
    (f"get_weather {ARGS}", [("get_weather", ARGS)]),
    ("  search\n{}", [("search", "{}")]),
    (f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>', [("get_weather", ARGS)]),
    ('<tool_call>{"name": "search", "arguments": "{\\"q\\": 1}"}</tool_call>\n<tool_call>{"name": "get_weather", '
     '"arguments": {}}</tool_call>', [("search", '{"q": 1}'), ("get_weather", "{}")]),
    (f'{{"name": "get_weather", "parameters": {ARGS}}}', [("get_weather", ARGS)]),
    ("The weather in Oslo is cold.", None), ("get_weather {broken", None), (f"lookup {ARGS}", None),
    ('<tool_call>{"name": "lookup", "arguments": {}}</tool_call>', None),
    ('<tool_call>{"name": "search", "arguments": {}}</tool_call> and some text', None),
    (f"Sure! get_weather {ARGS}", None), ('{"answer": 42}', None)])
def test_auto_replies_are_calls_only_when_they_are_nothing_but_calls(text, calls):
    import json as j
    parsed = tool_prompt.parse_calls(text, NAMES)
    assert (parsed if parsed is None else [(n, j.loads(a)) for n, a in parsed]) == (
        calls if calls is None else [(n, j.loads(a)) for n, a in calls])


@pytest.mark.parametrize("text, may", [("", True), ("  ", True), ("get_w", True), ("get_weather", True),
                                       ("get_weather ", True), ("get_weather \n{", True), ("<tool", True),
                                       ("<tool_call>{", True), ("{", True), ("The", False), ("get_weather is", False),
                                       ("get_weatherx", False), ("<tom", False)])
def test_streams_hold_a_reply_back_while_it_may_be_calls(text, may):
    assert tool_prompt.may_be_call(text, NAMES) == may


@pytest.mark.parametrize("text, reason", [(f"get_weather {ARGS}", "stop"), ("The weather is cold.", "stop"),
                                          (f"get_weather {ARGS[:9]}", "length"), ("get_w", "stop"),
                                          ("<tool_call>{\"name\": \"search\", \"arguments\": {}}</tool_call>",
                                           "stop")])
@pytest.mark.parametrize("cut", [1, 3, 7])
def test_auto_streams_say_what_whole_replies_say(text, reason, cut):
    """Streamed in pieces of `cut` characters, a reply's deltas add up to the whole reply's message."""
    fmt = AutoToolFormat("m", "chatcmpl-x", names=NAMES)
    whole = fmt.choice(0, text, reason)
    pieces = [text[i:i + cut] for i in range(0, len(text), cut)]
    chunks = [fmt.chunk(0, piece, reason if i == len(pieces) - 1 else None)["choices"][0]
              for i, piece in enumerate(pieces)]
    content = "".join(c["delta"].get("content") or "" for c in chunks)
    calls = [call for c in chunks for call in c["delta"].get("tool_calls", [])]
    message = whole["message"]
    assert content == (message["content"] or "")
    assert [(c["id"], c["function"]) for c in calls] == [(c["id"], c["function"])
                                                          for c in message.get("tool_calls") or []]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    assert whole["finish_reason"] == ("tool_calls" if message.get("tool_calls") else reason)


def test_auto_replies_through_the_server(client):
    """tool_choice "auto" (also the default): the tiny random model's reply is text, or calls if it made them."""
    for choice in ({}, {"tool_choice": "auto"}):
        for stream in (False, True):
            kwargs = dict(tools=[WEATHER, SEARCH], seed=2, max_tokens=12, **choice)
            if stream:
                chunks = list(chat(client, stream=True, **kwargs))
                assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
            else:
                reply = chat(client, **kwargs).choices[0]
                assert reply.finish_reason in ("stop", "length", "tool_calls")
                assert (reply.message.tool_calls is not None) == (reply.finish_reason == "tool_calls")
    offered = tool_prompt.with_tools(ASK, [WEATHER["function"]], None, auto=True)[0]["content"]
    assert "otherwise reply in text" in offered


# a template that renders tools and asks for Hermes' calls, as Qwen2's does
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nCall a function inside <tool_call></tool_call> tags as "
    '{"name": <function-name>, "arguments": <args-json-object>}. Functions:\n'
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '<tool_call>\n{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments }}}\n</tool_call>'
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hermes_client(tiny_models, tmp_path_factory):
    _, model_dir, adapters = tiny_models["llama"]
    with openai_client(model_dir, adapters, tmp_path_factory.mktemp("hermes"), HERMES_TEMPLATE, 2048) as c:
        yield c


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_templates_asking_for_hermes_calls_get_them(hermes_client, tool_choice):
    """Where the template asks for `<tool_call>` blocks, a required or named call is written that way (a byte a
    token: the completion holds the frame's bytes) and comes back as tool_calls, streamed or whole alike."""
    client = hermes_client
    assert tool_prompt.call_shape(HERMES_TEMPLATE) == "hermes" and tool_prompt.call_shape(CHATML) == "punica"
    llama3 = '{% if tools %}Respond as {"name": function name, "parameters": ...}{% endif %}{{ m.tool_calls }}'
    assert tool_prompt.call_shape(llama3) == "llama3"
    kwargs = dict(tools=[WEATHER, SEARCH], tool_choice=tool_choice, max_tokens=160, n=3, seed=4)
    whole = chat(client, **kwargs)
    done = [c for c in whole.choices if c.finish_reason == "tool_calls"]
    assert done
    for choice in done:
        (call,) = choice.message.tool_calls
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" or tool_choice == "required" and call.function.name == "search"
        assert list(args) == (["city", "unit"] if call.function.name == "get_weather" else ["query", "limit"])
    streamed = {}
    for chunk in chat(client, stream=True, **kwargs):
        for c in chunk.choices:
            for d in c.delta.tool_calls or ():
                streamed[c.index] = (d.function.name, d.function.arguments)
    assert streamed == {c.index: (c.message.tool_calls[0].function.name, c.message.tool_calls[0].function.arguments)
                        for c in done}
    one = chat(client, **{**kwargs, "n": 1, "seed": done[0].index + 4})
    frame = len('<tool_call>\n{"name": "", "arguments": }\n</tool_call>')
    if one.choices[0].finish_reason == "tool_calls":
        call = one.choices[0].message.tool_calls[0].function
        assert one.usage.completion_tokens >= frame + len(call.name) + len("{}")
