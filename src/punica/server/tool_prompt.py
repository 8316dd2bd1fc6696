"""Tool calls in the prompt, and in free replies (tool_choice "auto").

Prompts: for chat templates without tool support of their own, the functions a request offers go into the system
turn, and the calls of earlier assistant turns are written out as the model writes them (`name {arguments}`; with
one function left, the arguments alone). Tool results are turns of role "tool", which the template renders like
any other. A template that takes `tools` itself gets them as it expects.

Replies under "auto" are the model's own text; `parse_calls` reads a call out of one that begins with it, in any
of three shapes: Punica's (`name {arguments}`), Hermes' (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
one or more: what Qwen2's template asks for) or a bare JSON object with `name` and `arguments` (or `parameters`:
Llama 3.1's). A reply that begins otherwise is text."""

from __future__ import annotations

import json
import re

from punica.server.protocol import NO_PARAMETERS

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def takes_tools(chat_template: str | None) -> bool:
    """Whether the template renders `tools` and `tool_calls` itself (Hugging Face's convention)."""
    return bool(chat_template) and "tools" in chat_template and "tool_calls" in chat_template


def call_shape(chat_template: str | None) -> str:
    """How a template that takes tools asks for calls (SamplingParams.tool_call_shape): "hermes" where it asks for
    `<tool_call>` blocks (Qwen2's, Hermes'), "llama3" where for a JSON object with "parameters" (Llama 3.1's),
    else "punica"."""
    if not takes_tools(chat_template):
        return "punica"
    if HERMES_OPEN in chat_template:
        return "hermes"
    return "llama3" if '"parameters"' in chat_template else "punica"


def offer(functions: list[dict], forced: str | None, auto: bool = False) -> str:
    """The system text offering `functions`; `forced`: the one to call now (the reply is its arguments);
    `auto`: the reply may be text instead."""
    lines = ["You can call these functions (each: its name, what it does, the JSON schema of its arguments):"]
    lines += [json.dumps({"name": f["name"], "description": f.get("description", ""),
                          "parameters": f.get("parameters") or NO_PARAMETERS}) for f in functions]
    if forced is not None:
        lines.append(f"Call {forced} now: reply with its arguments, one JSON object.")
    elif auto:
        lines.append("To call one, reply with only its name, a space, then its arguments, one JSON object; "
                     "otherwise reply in text.")
    else:
        lines.append("To call one, reply with its name, a space, then its arguments, one JSON object.")
    return "\n".join(lines)


def written_calls(turn: dict) -> dict:
    """An assistant turn with its `tool_calls` written into its content, one call a line."""
    calls = turn.get("tool_calls") or []
    lines = [turn["content"]] if turn["content"] else []
    for call in calls:
        fn = call.get("function", {}) if isinstance(call, dict) else {}
        lines.append(f"{fn.get('name', '')} {fn.get('arguments', '')}".strip())
    return {**turn, "content": "\n".join(lines)}


def with_tools(turns: list[dict], functions: list[dict], forced: str | None, auto: bool = False) -> list[dict]:
    """`turns` for a template without tool support: the offer in the system turn (the first, or a new one)."""
    turns = [written_calls(t) if t["role"] == "assistant" and t.get("tool_calls") else t for t in turns]
    if not functions:
        return turns
    text = offer(functions, forced, auto)
    if turns and turns[0]["role"] in ("system", "developer"):
        return [{**turns[0], "content": f"{turns[0]['content']}\n\n{text}"}, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]


_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PUNICA = re.compile(r"([A-Za-z0-9_-]{1,64})\s+(\{.*)", re.DOTALL)


def parse_calls(text: str, names: list[str]) -> list[tuple[str, str]] | None:
    """The calls (name, arguments as JSON text) a free reply makes, if it is nothing but calls of the offered
    functions; None: it is text."""
    t = text.strip()
    if t.startswith(HERMES_OPEN):
        blocks = _HERMES.findall(t)
        if not blocks or _HERMES.sub("", t).strip():
            return None
        calls = [_json_call(block, names) for block in blocks]
        return None if None in calls else calls
    if t.startswith("{"):
        call = _json_call(t, names)
        return None if call is None else [call]
    match = _PUNICA.fullmatch(t)
    if match is None or match[1] not in names or not isinstance(_loads(match[2]), dict):
        return None
    return [(match[1], match[2])]


def may_be_call(text: str, names: list[str]) -> bool:
    """Whether a free reply that begins with `text` can still turn out to be calls (parse_calls): until it cannot,
    a stream holds it back."""
    t = text.lstrip()
    if not t or t.startswith("{") or HERMES_OPEN.startswith(t) or t.startswith(HERMES_OPEN):
        return True
    word = re.match(r"[A-Za-z0-9_-]*", t)[0]
    rest = t[len(word):]
    if not rest:  # a name still being written
        return any(n.startswith(word) for n in names)
    return word in names and (not rest.strip() or rest.lstrip()[0] == "{") and rest[0].isspace()


def _json_call(text: str, names: list[str]) -> tuple[str, str] | None:
    value = _loads(text)
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = _loads(arguments)
    return (value["name"], json.dumps(arguments)) if isinstance(arguments, dict) else None


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None
