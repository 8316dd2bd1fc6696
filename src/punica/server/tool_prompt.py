"""Tool calls in the prompt, for chat templates without tool support of their own: the functions a request
offers go into the system turn, and the calls of earlier assistant turns are written out as the model writes
them (`name {arguments}`; with one function left, the arguments alone). Tool results are turns of role "tool",
which the template renders like any other. A template that takes `tools` itself gets them as it expects."""

from __future__ import annotations

import json

from punica.server.protocol import NO_PARAMETERS


def takes_tools(chat_template: str | None) -> bool:
    """Whether the template renders `tools` and `tool_calls` itself (Hugging Face's convention)."""
    return bool(chat_template) and "tools" in chat_template and "tool_calls" in chat_template


def offer(functions: list[dict], forced: str | None) -> str:
    """The system text offering `functions`; `forced`: the one to call now (the reply is its arguments)."""
    lines = ["You can call these functions (each: its name, what it does, the JSON schema of its arguments):"]
    lines += [json.dumps({"name": f["name"], "description": f.get("description", ""),
                          "parameters": f.get("parameters") or NO_PARAMETERS}) for f in functions]
    if forced is not None:
        lines.append(f"Call {forced} now: reply with its arguments, one JSON object.")
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


def with_tools(turns: list[dict], functions: list[dict], forced: str | None) -> list[dict]:
    """`turns` for a template without tool support: the offer in the system turn (the first, or a new one)."""
    turns = [written_calls(t) if t["role"] == "assistant" and t.get("tool_calls") else t for t in turns]
    if not functions:
        return turns
    text = offer(functions, forced)
    if turns and turns[0]["role"] in ("system", "developer"):
        return [{**turns[0], "content": f"{turns[0]['content']}\n\n{text}"}, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]
