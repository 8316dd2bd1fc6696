"""The generation path shared by /v1/completions and /v1/chat/completions: resolve the model, tokenize,
queue one engine request per choice, then stream (SSE) or collect the outputs. A client that goes away
aborts its requests, which frees their KV blocks and adapter pins."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from punica import BadRequestError, SamplingParams, TokenLogprobs, UnknownModelError
from punica.server import tool_prompt
from punica.server.adapters import AdapterLoads
from punica.server.async_engine import AsyncEngine, Delivery, EngineFailure, RequestStream
from punica.server.formats import (
    AutoToolFormat,
    ChatFormat,
    CompletionFormat,
    ReasoningFormat,
    ToolCallFormat,
    sse,
)
from punica.server.metrics import RequestTracker, ServerMetrics
from punica.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    PromptTokensDetails,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    error_body,
    random_id,
)

CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never seen by the client


def unknown_model(model: str, base: str) -> UnknownModelError:
    return UnknownModelError(f"the model {model!r} does not exist; GET /v1/models lists the base model {base!r} "
                             "and the loaded adapters")


@dataclass
class Choices:
    """What the client has been sent of each choice: text so far and finish reasons."""

    n: int
    holdback: int  # trailing characters kept back while streaming: they may start a stop string
    generated: bool = True  # False: the client asked for the prompt alone (scores_only): drop what is generated
    texts: list[str] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # prompt tokens each choice read from the prefix cache
    logprobs: list[list[TokenLogprobs] | None] = field(default_factory=list)  # when the request asks for them
    prompt_logprobs: list[list[TokenLogprobs] | None] = field(default_factory=list)  # echo with logprobs

    def __post_init__(self):
        self.texts, self.reasons, self.tokens, self.cached = [""] * self.n, [None] * self.n, [0] * self.n, [0] * self.n
        self.logprobs, self.prompt_logprobs = [None] * self.n, [None] * self.n

    def advance(self, d: Delivery) -> str:
        """The new text of `d`'s choice that is safe to send now (streamed text is always a prefix of the
        final text, even when a stop string cuts it)."""
        out, i = d.output, d.index
        self.cached[i] = out.num_cached_tokens
        if not self.generated:
            self.prompt_logprobs[i] = out.prompt_logprobs
            self.reasons[i] = "length" if out.finished else None
            return ""
        text = out.text if out.finished or not self.holdback else out.text[:max(len(out.text) - self.holdback, 0)]
        new = text[len(self.texts[i]):] if text.startswith(self.texts[i]) else ""
        self.texts[i] += new
        self.tokens[i] = len(out.token_ids)
        if out.logprobs is not None:
            self.logprobs[i] = out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[i] = out.prompt_logprobs
        if out.finished:
            self.reasons[i] = out.finish_reason
        return new

    def all_logprobs(self, i: int, start: int = 0) -> list[TokenLogprobs] | None:
        """Choice i's log-probabilities from entry `start` on: its prompt's when echoed, then its completion's
        (None: not asked). Streaming asks for the new ones only, without copying those sent."""
        prompt, generated = self.prompt_logprobs[i], self.logprobs[i]
        if prompt is None and generated is None:
            return None
        prompt, generated = prompt or [], generated or []
        if start >= len(prompt):
            return generated[start - len(prompt):]
        return prompt[start:] + generated

    def usage(self, num_prompt_tokens: int, per_prompt: int) -> Usage:
        """`per_prompt`: choices per prompt (`n`), which come prompt by prompt."""
        done = sum(self.tokens)
        cached = sum(min(self.cached[i:i + per_prompt]) for i in range(0, self.n, per_prompt))
        return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=done, total_tokens=num_prompt_tokens + done,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


@dataclass
class Job:
    """One generation request, resolved: token prompts, each prompt's max_tokens, the adapter (None: base)
    and the response format; `n` choices per prompt."""

    req: SamplingFields
    prompts: list[list[int]]
    limits: list[int]
    lora: str | None
    fmt: CompletionFormat
    arrival: float
    end_of_turn: tuple[int, ...] = ()
    echo: list[str] | None = None  # each prompt's text, which its choices repeat before their completions

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def echoed(self, choice: int) -> str:
        """The text choice `choice` repeats before its completion ("" unless echo)."""
        return "" if self.echo is None else self.echo[choice // self.req.n]

    def sampling_params(self) -> list[SamplingParams]:
        """One per choice, in choice order (prompt-major)."""
        return [self.req.sampling_params(limit, j, self.end_of_turn) for limit in self.limits
                for j in range(self.req.n)]


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, model_name: str, on_demand: bool = False,
                 reasoning_parser: str | None = None):
        self.engine = engine
        self.reasoning_parser = reasoning_parser  # ServerConfig.reasoning_parser
        self.metrics = metrics
        self.model_name = model_name
        self.adapters = AdapterLoads(engine, metrics, model_name, on_demand)
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.info.max_model_len
        self.end_of_turn = self.tokenizer.end_of_turn if self.tokenizer is not None else ()
        # longer texts cannot fit the context: refused before tokenizing them (which would take seconds)
        self.max_chars = self.max_model_len * (self.tokenizer.max_token_chars if self.tokenizer else 1)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id) if self.tokenizer is not None else str(token_id)

    async def resolve_lora(self, model: str) -> str | None:
        """None for the base model, else the adapter's name; 404 for a name nobody serves (unless it loads on
        demand: see AdapterLoads.on_demand)."""
        if model == self.model_name:
            return None
        if model not in self.engine.engine.adapters.paths and not await self.adapters.on_demand(model):
            raise unknown_model(model, self.model_name)
        return model

    def encode(self, prompt: str | list[int], special_tokens: bool = True, keep: int | None = None) -> list[int]:
        """Token ids of one prompt (run on a worker thread: the tokenizer releases the GIL); `keep`: only its last
        this many (truncate_prompt_tokens)."""
        if not isinstance(prompt, str):
            return list(prompt)[-keep:] if keep else list(prompt)
        if self.tokenizer is None:
            raise BadRequestError("this model directory has no tokenizer.json: send token ids, not text")
        self.check_chars(len(prompt), "the prompt", keep)
        ids = self.tokenizer.encode(prompt, add_special_tokens=special_tokens)
        return ids[-keep:] if keep else ids

    def check_chars(self, chars: int, what: str, keep: int | None = None) -> None:
        """BadRequestError for a text too long to tokenize for the context (or, truncated to `keep` tokens, for
        the request body's limit, which --max-request-bytes keeps)."""
        if keep:
            return
        if chars > self.max_chars:
            raise BadRequestError(f"{what} has {chars} characters, more than {self.max_model_len} tokens (the context, "
                                  f"max_model_len) can hold; shorten it")

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    functions: list[dict] = (), forced: str | None = None, auto: bool = False,
                    template_kwargs: dict | None = None, keep: int | None = None) -> list[int]:
        """The chat template over the messages, tokenized (run on a worker thread). `functions`: the tools the
        reply may call (`forced`: the one it calls; `auto`: it may reply in text instead), offered as the
        template takes them (tool_prompt.py); `template_kwargs`: the request's chat_template_kwargs."""
        if self.tokenizer is None:
            raise BadRequestError("this model directory has no tokenizer.json, so it has no chat template")
        turns = [m.as_template_dict() for m in messages]
        if len(turns) > self.max_model_len:
            raise BadRequestError(f"{len(turns)} messages cannot fit the context of {self.max_model_len} tokens")
        native = tool_prompt.takes_tools(self.tokenizer.chat_template)
        if not native:
            turns = tool_prompt.with_tools(turns, list(functions), forced, auto)
        self.check_chars(sum(len(m["content"]) for m in turns), "the conversation", keep)
        tools = [{"type": "function", "function": f} for f in functions] if native else None
        text = self.tokenizer.apply_chat_template(turns, add_generation_prompt, tools, template_kwargs)
        return self.encode(text, special_tokens=False, keep=keep)

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        if req.model is not None:
            await self.resolve_lora(req.model)
        if req.messages is not None:
            ids = await asyncio.to_thread(self.render_chat, req.messages, req.add_generation_prompt,
                                          template_kwargs=req.chat_template_kwargs)
        else:
            ids = await asyncio.to_thread(self.encode, req.prompt, req.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        if req.model is not None:
            await self.resolve_lora(req.model)
        if self.tokenizer is None:
            raise BadRequestError("this model directory has no tokenizer.json, so token ids have no text")
        vocab = self.engine.engine.model_config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise BadRequestError(f"token ids must be in [0, {vocab}), got {bad}")
        return DetokenizeResponse(prompt=self.decode(req.tokens))

    def max_tokens(self, prompt: list[int], requested: int | None, explicit: bool) -> int:
        """`requested` if it fits the context; an implicit default is clipped to the room left."""
        room = self.max_model_len - len(prompt)
        if room <= 0:
            raise BadRequestError(f"the prompt has {len(prompt)} tokens but the context holds {self.max_model_len} "
                                  "(max_model_len), including at least one new token; shorten the prompt")
        if requested is None or (not explicit and requested > room):
            return room
        if requested > room:
            raise BadRequestError(f"max_tokens={requested} plus the prompt's {len(prompt)} tokens exceeds the "
                                  f"context of {self.max_model_len} tokens; lower max_tokens to at most {room}")
        return requested

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        lora = await self.resolve_lora(req.model)
        keep = req.truncate_prompt_tokens
        prompts = await asyncio.to_thread(lambda: [self.encode(p, keep=keep) for p in req.prompts()])
        explicit = req.max_tokens is not None  # the default (omitted or null) is clipped to the room left
        # scores only: the engine samples one token (its logits come with the prompt's), which nobody is sent
        limits = [self.max_tokens(p, 1 if req.scores_only else req.requested_max_tokens, explicit) for p in prompts]
        fmt = CompletionFormat(req.model, random_id("cmpl"), self.token_text)
        echo = None
        if req.echo:  # what was scored: a truncated prompt's kept tokens
            echo = [p if isinstance(p, str) and not keep else self.decode(ids)
                    for p, ids in zip(req.prompts(), prompts)]
        return await self._generate(Job(req, prompts, limits, lora, fmt, arrival, echo=echo), request)

    @functools.cached_property
    def can_constrain(self) -> bool:
        """Whether the tokenizer gives each token's bytes, which constrained output needs (Tokenizer.token_bytes)."""
        try:
            return self.tokenizer is not None and bool(self.tokenizer.token_bytes)
        except BadRequestError:
            return False

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        lora = await self.resolve_lora(req.model)
        tools, auto = req.tool_use(), req.auto_tools  # the tools the reply calls one of; or calls it may make
        forced = next(iter(tools)) if tools is not None and len(tools) == 1 else None
        functions = [f for f in req.functions_offered() if auto or tools is not None and f["name"] in tools]
        prompt = await asyncio.to_thread(self.render_chat, req.messages, req.add_generation_prompt, functions,
                                         forced, auto, req.chat_template_kwargs, req.truncate_prompt_tokens)
        limit = self.max_tokens(prompt, req.requested_max_tokens, explicit=True)
        request_id = random_id("chatcmpl")
        if (tools is not None or auto) and self.tokenizer is not None:
            req._call_shape = tool_prompt.call_shape(self.tokenizer.chat_template)
            # the vocabulary's bytes, read once (on a worker thread); without them "auto" replies stay free
            req._constrain_auto = await asyncio.to_thread(lambda: self.can_constrain)
        if tools is not None and req._call_shape == "punica":
            fmt = ToolCallFormat(req.model, request_id, self.token_text, forced)
        elif tools is not None or auto:  # a call in the template's shape is read out as a free reply's calls are
            fmt = AutoToolFormat(req.model, request_id, self.token_text, [f["name"] for f in functions])
        else:
            fmt = ChatFormat(req.model, request_id, self.token_text)
        if self.reasoning_parser is not None:
            fmt = ReasoningFormat(fmt, self.reasoning_parser)
        return await self._generate(Job(req, [prompt], [limit], lora, fmt, arrival, self.end_of_turn), request)

    async def _generate(self, job: Job, request: Request) -> Response:
        params = job.sampling_params()
        stream = await self.engine.add([p for p in job.prompts for _ in range(job.req.n)], params, job.lora)
        tracker = self.metrics.track(job.req.model, job.arrival)
        tracker.on_prompts(job.num_prompt_tokens)
        choices = Choices(len(params), max((len(s) for s in params[0].stop), default=1) - 1,
                          generated=not job.req.scores_only)
        if job.req.stream:
            body = self._events(stream, choices, job, tracker)
            return EventStream(body, lambda: self._close(stream, tracker))
        try:
            if not await _until_done_or_gone(self._consume(stream, choices, tracker), request):
                return Response(status_code=CLIENT_CLOSED)
        finally:
            self._close(stream, tracker)
        texts = [job.echoed(i) + text for i, text in enumerate(choices.texts)]
        entries = [choices.all_logprobs(i) for i in range(choices.n)]
        logprobs = [None if e is None else job.fmt.logprobs(i, e) for i, e in enumerate(entries)]
        usage = choices.usage(job.num_prompt_tokens, job.req.n)
        return JSONResponse(job.fmt.whole(texts, choices.reasons, usage, logprobs))

    async def _consume(self, stream: RequestStream, choices: Choices, tracker: RequestTracker) -> None:
        async for d in stream:
            tracker.on_output(d)
            choices.advance(d)
            if d.output.error:
                stream.abort()
                raise EngineFailure(d.output.error)

    async def _events(self, stream: RequestStream, choices: Choices, job: Job,
                      tracker: RequestTracker) -> AsyncIterator[str]:
        """The SSE body; EventStream stops the engine requests and closes the metrics however it ends."""
        fmt = job.fmt
        for i in range(choices.n):
            if fmt.opening(i):
                yield sse(fmt.opening(i))
        sent = [0] * choices.n  # logprobs streamed per choice
        echoed = [job.echo is None] * choices.n
        async for d in stream:
            tracker.on_output(d)
            if d.output.error:
                yield sse(error_body(d.output.error, "server_error", "engine_failure"))
                return
            i, new = d.index, choices.advance(d)
            if not echoed[i]:  # the first chunk of an echoing choice starts with its prompt
                new, echoed[i] = job.echoed(i) + new, True
            entries = choices.all_logprobs(i, sent[i])
            if new or entries or d.output.finished:
                logprobs = None if entries is None else fmt.logprobs(i, entries)
                sent[i] += len(entries or ())
                yield sse(fmt.chunk(i, new, choices.reasons[i], logprobs))
        if job.req.include_usage:
            yield sse(fmt.usage_chunk(choices.usage(job.num_prompt_tokens, job.req.n)))
        yield sse("[DONE]")

    def _close(self, stream: RequestStream, tracker: RequestTracker) -> None:
        """Stop the engine requests still running and close the metrics (once, however often called)."""
        aborted = list(stream.unfinished)
        stream.abort()
        tracker.close(time.monotonic(), aborted)


class EventStream(StreamingResponse):
    """Server-sent events. However the response ends, `on_end` runs: also when the client leaves before the
    first byte, where Starlette cancels the response before it starts the body (whose own `finally` then
    never runs, and the engine would go on generating for nobody)."""

    def __init__(self, body: AsyncGenerator[str, None], on_end: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._body, self._on_end = body, on_end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end()
            await self._body.aclose()


async def _until_done_or_gone(work, request: Request) -> bool:
    """Run `work` unless the client disconnects first (then cancel it and return False)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        return False
    task.result()  # re-raise EngineFailure and friends
    return True


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body is read already, so receive only waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
