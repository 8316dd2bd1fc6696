"""Response bodies of /v1/completions and /v1/chat/completions, whole and as SSE chunks.

Both endpoints share the generation path (serving.py); a format only shapes what each choice says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

from punica import TokenLogprobs
from punica.server.protocol import Usage
from punica.server.tool_prompt import may_be_call, parse_calls

TokenText = Callable[[int], str]  # a token id's text (Tokenizer.token_text)
LOGPROB_FLOOR = -9999.0  # a zero probability's -inf, which JSON cannot carry


def finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def finish_reason(reason: str | None) -> str | None:
    """OpenAI knows "stop" and "length"; the engine's other reasons never reach a client."""
    return reason if reason in ("stop", "length") else None


class CompletionFormat:
    """Completion: {id, object: "text_completion", created, model, choices: [{index, text, logprobs,
    finish_reason}], usage}. Chunks have the same shape with the new text in `text`. `logprobs`, when asked
    for: {tokens, token_logprobs, top_logprobs (each token's top entries and itself: token text -> logprob),
    text_offset (where each token's text starts in the completion)}."""

    object = "text_completion"

    def __init__(self, model: str, request_id: str, token_text: TokenText = str):
        self.model = model
        self.id = request_id
        self.created = int(time.time())
        self.token_text = token_text
        self._offsets: dict[int, int] = {}  # choice -> characters of token text given so far (text_offset)

    def _envelope(self, choices: list[dict], obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def choice(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(reason)}

    def logprobs(self, index: int, entries: Sequence[TokenLogprobs]) -> dict:
        """The `logprobs` of choice `index`'s next tokens (all of them, or a chunk's: each call continues
        where the last ended)."""
        tokens = [self.token_text(e.token_id) for e in entries]
        starts, offset = [], self._offsets.get(index, 0)
        for token in tokens:
            starts.append(offset)
            offset += len(token)
        self._offsets[index] = offset
        tops = [None if e.logprob is None else  # a prompt's first token: nothing precedes it
                {self.token_text(t): finite(v) for t, v in (*e.top, (e.token_id, e.logprob))} for e in entries]
        return {"tokens": tokens, "token_logprobs": [None if e.logprob is None else finite(e.logprob) for e in entries],
                "top_logprobs": tops, "text_offset": starts}

    def opening(self, index: int) -> dict | None:
        """A chunk sent before any text of choice `index` (none for completions)."""
        return None

    def chunk(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        return self._envelope([self.choice(index, text, reason, logprobs)], self.object)

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._envelope([], self.object), "usage": usage.model_dump()}

    def whole(self, texts: list[str], reasons: list[str | None], usage: Usage,
              logprobs: list[dict | None] | None = None) -> dict:
        logprobs = logprobs or [None] * len(texts)
        choices = [self.choice(i, t, r, lp) for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
        return {**self._envelope(choices, self.object), "usage": usage.model_dump()}


class ChatFormat(CompletionFormat):
    """Chat completion: {id, object: "chat.completion", created, model, choices: [{index, message:
    {role: "assistant", content}, finish_reason}], usage}. Chunks ("chat.completion.chunk") carry
    `delta`: first {role}, then {content} pieces, last {} with the finish_reason."""

    object = "chat.completion"

    def choice(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason(reason)}

    def logprobs(self, index: int, entries: Sequence[TokenLogprobs]) -> dict:
        """{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal: null}."""
        def item(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}
        content = [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]} for e in entries]
        return {"content": content, "refusal": None}

    def _delta(self, index: int, delta: dict, reason: str | None, logprobs: dict | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason(reason)}
        return self._envelope([choice], "chat.completion.chunk")

    def opening(self, index: int) -> dict | None:
        return self._delta(index, {"role": "assistant", "content": ""}, None)

    def chunk(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        return self._delta(index, {"content": text} if text else {}, reason, logprobs)

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._envelope([], "chat.completion.chunk"), "usage": usage.model_dump()}

    def tool_call(self, index: int, name: str, arguments: str, k: int = 0) -> dict:
        """Call k of choice `index` (ToolCallFormat, AutoToolFormat)."""
        return {"id": f"call_{self.id.removeprefix('chatcmpl-')}_{index}_{k}", "type": "function",
                "function": {"name": name, "arguments": arguments}}


class ToolCallFormat(ChatFormat):
    """A chat completion whose reply is one tool call: message {role: "assistant", content: null, tool_calls:
    [{id, type: "function", function: {name, arguments}}]}, finish_reason "tool_calls" ("length" when cut).
    `tool`: the function's name where the request leaves one (the output is its arguments); None: the output
    is a name, a space, then the arguments. Chunks carry the call in `delta.tool_calls`: its index, id, type
    and name first (once the name is written), then the arguments piece by piece."""

    def __init__(self, model: str, request_id: str, token_text: TokenText = str, tool: str | None = None):
        super().__init__(model, request_id, token_text)
        self.tool = tool
        self._held: dict[int, str] = {}  # streaming, per choice: text of a name not yet complete
        self._named: set[int] = set()  # streaming: choices whose call's name has been sent

    def split(self, text: str) -> tuple[str | None, str]:
        """(name, arguments) of an output; the name is None until it is complete."""
        if self.tool is not None:
            return self.tool, text
        name, space, arguments = text.partition(" ")
        return (name, arguments) if space else (None, "")

    @staticmethod
    def reason(reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" else finish_reason(reason)

    def choice(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        name, arguments = self.split(text)
        message = ({"role": "assistant", "content": None, "tool_calls": [self.tool_call(index, name, arguments)]}
                   if name is not None else {"role": "assistant", "content": text})  # cut inside the name
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": self.reason(reason)}

    def opening(self, index: int) -> dict | None:
        return self._delta(index, {"role": "assistant", "content": None}, None)

    def chunk(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        if index in self._named:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
        else:
            held = self._held.get(index, "") + text
            name, arguments = self.split(held)
            if name is None:
                self._held[index] = held
                delta = {"content": held} if reason is not None and held else {}  # cut inside the name
            else:
                self._named.add(index)
                self._held.pop(index, None)
                delta = {"tool_calls": [{"index": 0, **self.tool_call(index, name, arguments)}]}
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": self.reason(reason)}
        return self._envelope([choice], "chat.completion.chunk")


class AutoToolFormat(ChatFormat):
    """A chat completion under tool_choice "auto": the model's own reply, given as calls of the offered functions
    (`names`) when it is nothing but calls (tool_prompt.parse_calls; finish_reason "tool_calls"), else as text.
    Streaming holds the text back while it may still turn out to be calls (tool_prompt.may_be_call) and sends
    calls whole when the reply ends."""

    def __init__(self, model: str, request_id: str, token_text: TokenText = str, names: list[str] = ()):
        super().__init__(model, request_id, token_text)
        self.names = list(names)
        self._held: dict[int, str] = {}  # streaming, per choice: text that may still be calls
        self._text: set[int] = set()  # streaming: choices known to be text

    def calls(self, index: int, text: str, reason: str | None) -> list[dict] | None:
        """The calls a finished reply makes (None: text)."""
        calls = parse_calls(text, self.names) if reason == "stop" else None
        return None if calls is None else [self.tool_call(index, name, args, k) for k, (name, args) in enumerate(calls)]

    def choice(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        calls = self.calls(index, text, reason)
        if calls is None:
            return super().choice(index, text, reason, logprobs)
        return {"index": index, "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "logprobs": logprobs, "finish_reason": "tool_calls"}

    def chunk(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        if index in self._text:
            return super().chunk(index, text, reason, logprobs)
        held = self._held.pop(index, "") + text
        if reason is None and may_be_call(held, self.names):
            self._held[index] = held
            return self._delta(index, {}, None, logprobs)
        calls = self.calls(index, held, reason)
        if calls is None:
            self._text.add(index)
            return super().chunk(index, held, reason, logprobs)
        choice = {"index": index, "delta": {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]},
                  "logprobs": logprobs, "finish_reason": "tool_calls"}
        return self._envelope([choice], "chat.completion.chunk")


class ThinkSplitter:
    """Splits a reply, as it streams, into reasoning (between <think> and </think>) and content (the rest, less
    the newlines that open it). `opened`: the prompt opened the <think> block (deepseek_r1), so the reply is
    reasoning until </think> (an opening tag it writes anyway is dropped); else (qwen3) only a reply that opens
    with <think> reasons. Text that may still be the start of a tag is held until it is known not to be."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, opened: bool):
        self.state = "open?"  # then "reasoning", "content start" (newlines still dropped) or "content"
        self.opened = opened
        self.held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) of the next piece of the reply; `final`: the reply ends with it."""
        reasoning, content = [], []
        text, self.held = self.held + text, ""
        while text:
            if self.state == "open?":
                head = text.lstrip()
                if head.startswith(self.OPEN):
                    text, self.state = head[len(self.OPEN):], "reasoning"
                elif self.OPEN.startswith(head) and not final:
                    self.held, text = text, ""
                else:
                    self.state = "reasoning" if self.opened else "content"
            elif self.state == "reasoning":
                end = text.find(self.CLOSE)
                if end >= 0:
                    reasoning.append(text[:end])
                    text, self.state = text[end + len(self.CLOSE):], "content start"
                else:
                    keep = 0 if final else _tag_prefix(text, self.CLOSE)
                    reasoning.append(text[:len(text) - keep])
                    self.held, text = text[len(text) - keep:], ""
            elif self.state == "content start":
                text = text.lstrip("\n")
                if text:
                    self.state = "content"
            else:
                content.append(text)
                text = ""
        return "".join(reasoning), "".join(content)


def _tag_prefix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-n:])), 0)


class ReasoningFormat:
    """A chat format whose replies' <think> blocks go to `reasoning_content` (in `message`, and in `delta` as they
    stream); the rest goes through `inner` (any chat format: text, tool calls). Whole and streamed replies
    split alike. Everything else is the inner format's."""

    def __init__(self, inner: ChatFormat, parser: str):
        self.inner = inner
        self.opened = parser == "deepseek_r1"
        self._splitters: dict[int, ThinkSplitter] = {}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def split(self, text: str) -> tuple[str | None, str]:
        reasoning, content = ThinkSplitter(self.opened).feed(text, final=True)
        return reasoning or None, content

    def whole(self, texts: list[str], reasons: list[str | None], usage: Usage,
              logprobs: list[dict | None] | None = None) -> dict:
        parts = [self.split(t) for t in texts]
        body = self.inner.whole([content for _, content in parts], reasons, usage, logprobs)
        for choice, (reasoning, _) in zip(body["choices"], parts):
            choice["message"]["reasoning_content"] = reasoning
        return body

    def chunk(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        splitter = self._splitters.setdefault(index, ThinkSplitter(self.opened))
        reasoning, content = splitter.feed(text, final=reason is not None)
        body = self.inner.chunk(index, content, reason, logprobs)
        if reasoning:
            body["choices"][0]["delta"]["reasoning_content"] = reasoning
        return body
