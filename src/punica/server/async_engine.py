"""The Engine in a thread of its own, driven from asyncio.

The engine is single-threaded, so only the engine thread touches it. The event loop sends it commands
(add, abort, load, unload, ...) through a thread-safe queue; the engine thread runs them between steps and
hands each step's outputs back with `loop.call_soon_threadsafe`, one call per step, into per-request
asyncio queues. An exception inside a step fails the requests of that step and the server keeps going.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from punica import Engine, RequestOutput, SamplingParams

log = logging.getLogger("punica.server")
IDLE_POLL_S = 0.1  # how often an idle engine thread looks at its stop flag
STALLED_WAIT_S = 0.005  # nothing could be scheduled: wait this long for a command before retrying


class EngineFailure(Exception):
    """A step of the engine raised while it ran this request, or the engine thread died (HTTP 500)."""


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of the engine's counters, taken by the engine thread after every step."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    adapters_loaded: int = 0
    adapter_slots_used: int = 0
    device_loads: int = 0
    device_evictions: int = 0
    disk_loads: int = 0
    preemptions: int = 0
    step_errors: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, and found there
    prefix_cache_hits: int = 0
    prefix_cache_evictions: int = 0

    @staticmethod
    def of(engine: Engine, step_errors: int) -> EngineStats:
        a, b = engine.adapters, engine.blocks
        return EngineStats(engine.num_running, engine.num_waiting, b.usage, len(a.paths),
                           len(a.slots.resident()), a.device_loads, a.device_evictions, a.cache.loads,
                           engine.num_preemptions, step_errors, b.queried_tokens, b.hit_tokens, b.evicted_blocks)


@dataclass(frozen=True)
class Delivery:
    """One output of choice `index`, stamped by the engine thread at `time` (time.monotonic)."""

    index: int
    output: RequestOutput
    time: float


class RequestStream:
    """The outputs of one HTTP request's engine requests (one per choice), in the order produced."""

    def __init__(self, owner: AsyncEngine, ids: list[str]):
        self._owner = owner
        self.ids = ids
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self.unfinished = set(ids)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delivery:
        if not self.unfinished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if item.output.finished:
            self.unfinished.discard(item.output.request_id)
        return item

    def abort(self) -> None:
        """Stop every unfinished choice (client gone); frees their KV blocks and adapter pins."""
        if self.unfinished:
            self._owner.abort(sorted(self.unfinished))
            self.unfinished.clear()


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats = EngineStats.of(engine, 0)
        self.step_errors = 0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[RequestStream, int]] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._dead: str | None = None  # why the engine thread died, once it has

    # lifecycle (event loop side)
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="punica-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # commands (event loop side)
    async def call(self, fn: Callable[..., Any], *args) -> Any:
        """Run `fn(*args)` on the engine thread between steps; return its result or raise its exception
        (EngineFailure once the engine thread has died)."""
        future = self._loop.create_future()
        self._commands.put((fn, args, future))
        if self._dead is not None:  # the thread may have drained the queue before this put
            self._fail_commands()
        return await future

    async def add(self, prompts: list[list[int]], params: list[SamplingParams], lora: str | None) -> RequestStream:
        """Queue one engine request per (prompt, params) pair, all or none. Raises what the engine raises
        (BadRequestError, UnknownModelError, CapacityError)."""
        for p in {p.grammar_key: p for p in params if p.grammar_key is not None}.values():
            await asyncio.to_thread(self.engine.grammar, p)  # JSON modes: built here, not on the engine thread
        return await self.call(self._add, prompts, params, lora)

    def abort(self, ids: list[str]) -> None:
        self._commands.put((self._abort, (ids,), None))

    # engine thread
    def _add(self, prompts: list[list[int]], params: list[SamplingParams], lora: str | None) -> RequestStream:
        added = self.engine.add_requests(prompts, params, [lora] * len(prompts))
        stream = RequestStream(self, added)
        for index, rid in enumerate(added):
            self._sinks[rid] = (stream, index)
        return stream

    def _abort(self, ids: list[str]) -> None:
        for rid in ids:
            self._sinks.pop(rid, None)
            self.engine.abort(rid)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug outside a step: fail everyone instead of leaving them waiting
            log.exception("the engine thread died")
            self._dead = f"the engine thread died ({type(exc).__name__}: {exc}); restart the server"
            self._fail_commands()
            self._deliver([self._failure(rid, self._dead) for rid in list(self._sinks)])

    def _fail_commands(self) -> None:
        while True:
            try:
                _, _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None:
                self._loop.call_soon_threadsafe(_resolve, future, None, EngineFailure(self._dead))

    def _serve(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.has_unfinished()
            self._run_commands(wait=None if busy else IDLE_POLL_S)
            if self.engine.has_unfinished():
                produced = self._step()
                if not produced and self.engine.num_running == 0:
                    self._run_commands(wait=STALLED_WAIT_S)  # e.g. the queue head waits for a slot
            self.stats = EngineStats.of(self.engine, self.step_errors)

    def _run_commands(self, wait: float | None) -> None:
        try:
            command = self._commands.get(timeout=wait) if wait else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._execute(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _execute(self, fn: Callable[..., Any], args: tuple, future: asyncio.Future | None) -> None:
        try:
            result, error = fn(*args), None
        except Exception as exc:  # reported to the caller, who maps it to an HTTP status
            result, error = None, exc
        if future is None:
            if error is not None:
                log.warning("engine command %s failed: %s", getattr(fn, "__name__", fn), error)
            return
        self._loop.call_soon_threadsafe(_resolve, future, result, error)

    def _step(self) -> bool:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self._fail_step(exc)
            return True
        self._deliver(outputs)
        return bool(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now, batch = time.monotonic(), []
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None:
                batch.append((sink[0], Delivery(sink[1], out, now)))
        if batch:
            self._loop.call_soon_threadsafe(_put_all, batch)

    def _fail_step(self, exc: Exception) -> None:
        """Fail the requests the broken step was about: the running ones, or, when none was running, the
        head of the queue (whose admission raised). Each failure removes a request, so a fault that
        repeats cannot stall the engine."""
        self.step_errors += 1
        log.exception("engine step failed; failing the requests of this step", exc_info=exc)
        victims = [s.request_id for s in self.engine.scheduler.running]
        if not victims and self.engine.scheduler.waiting:
            victims = [self.engine.scheduler.waiting[0].request_id]
        message = f"the engine failed while running this request: {type(exc).__name__}: {exc}"
        self._deliver([self._failure(rid, message) for rid in victims])

    def _failure(self, request_id: str, message: str) -> RequestOutput:
        try:
            self.engine.abort(request_id)
        except Exception:  # the state may be broken; the request is gone for the client either way
            log.exception("aborting %s after a failed step", request_id)
        return RequestOutput(request_id=request_id, token_ids=[], text="", new_token_ids=[], new_text="",
                             finished=True, finish_reason="error", num_prompt_tokens=0, error=message)


def _resolve(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.cancelled():
        if isinstance(result, RequestStream):  # the caller left before its requests were queued
            result.abort()
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_all(batch: list[tuple[RequestStream, Delivery]]) -> None:
    for stream, delivery in batch:
        stream.queue.put_nowait(delivery)
