"""Response bodies of /v1/completions and /v1/chat/completions, whole and as SSE chunks.

Both endpoints share the generation path (serving.py); a format only shapes what each choice says.
"""

from __future__ import annotations

import json
import time

from punica.server.protocol import Usage


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def finish_reason(reason: str | None) -> str | None:
    """OpenAI knows "stop" and "length"; the engine's other reasons never reach a client."""
    return reason if reason in ("stop", "length") else None


class CompletionFormat:
    """Completion: {id, object: "text_completion", created, model, choices: [{index, text, logprobs,
    finish_reason}], usage}. Chunks have the same shape with the new text in `text`."""

    object = "text_completion"

    def __init__(self, model: str, request_id: str):
        self.model = model
        self.id = request_id
        self.created = int(time.time())

    def _envelope(self, choices: list[dict], obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def choice(self, index: int, text: str, reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}

    def opening(self, index: int) -> dict | None:
        """A chunk sent before any text of choice `index` (none for completions)."""
        return None

    def chunk(self, index: int, text: str, reason: str | None) -> dict:
        return self._envelope([self.choice(index, text, reason)], self.object)

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._envelope([], self.object), "usage": usage.model_dump()}

    def whole(self, texts: list[str], reasons: list[str | None], usage: Usage) -> dict:
        choices = [self.choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**self._envelope(choices, self.object), "usage": usage.model_dump()}


class ChatFormat(CompletionFormat):
    """Chat completion: {id, object: "chat.completion", created, model, choices: [{index, message:
    {role: "assistant", content}, finish_reason}], usage}. Chunks ("chat.completion.chunk") carry
    `delta`: first {role}, then {content} pieces, last {} with the finish_reason."""

    object = "chat.completion"

    def choice(self, index: int, text: str, reason: str | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason(reason)}

    def _delta(self, index: int, delta: dict, reason: str | None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason(reason)}
        return self._envelope([choice], "chat.completion.chunk")

    def opening(self, index: int) -> dict | None:
        return self._delta(index, {"role": "assistant", "content": ""}, None)

    def chunk(self, index: int, text: str, reason: str | None) -> dict:
        return self._delta(index, {"content": text} if text else {}, reason)

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._envelope([], "chat.completion.chunk"), "usage": usage.model_dump()}
