"""The engine side of the demo: one background thread owns the Engine and runs rounds. A round sends one
prompt to every pane's model (base or adapter) as one request each, so all of them share every batch,
and reports what each pane gained, coalesced to a few reports a second so the UI never floods."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from punica import Engine, PunicaError, SamplingParams


@dataclass
class Progress:
    """What a round did since its previous report. `deltas`: pane index -> text gained."""

    round_id: int
    deltas: dict[int, str] = field(default_factory=dict)
    finished: dict[int, str] = field(default_factory=dict)  # pane index -> finish reason
    pane_tokens: dict[int, int] = field(default_factory=dict)  # pane index -> tokens so far
    tokens: int = 0  # generated this round, all panes together
    elapsed: float = 0.0
    batch_size: int = 0
    peak_batch_size: int = 0
    done: bool = False
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    def carry(self) -> Progress:
        """The next report: running totals kept, deltas emptied."""
        return Progress(self.round_id, pane_tokens=dict(self.pane_tokens), tokens=self.tokens, elapsed=self.elapsed,
                        batch_size=self.batch_size, peak_batch_size=self.peak_batch_size)


def prompt_ids(engine: Engine, text: str) -> list[int] | str:
    """The user message in the model's chat template when it has one (instruct models answer properly),
    else the raw text."""
    tok = engine.tokenizer
    if tok is None or not tok.chat_template:
        return text
    return tok.chat_ids([{"role": "user", "content": text}])


def chat_stop_ids(engine: Engine) -> list[int]:
    """The template's end-of-turn token, which may differ from config.json's eos."""
    return list(engine.tokenizer.end_of_turn) if engine.tokenizer is not None else []


class EngineLoop:
    """`submit` from any thread; `run` is the body of the one thread that touches the engine. A new
    prompt aborts the round in flight. `report` is called on the engine thread; it must be thread-safe."""

    def __init__(self, engine: Engine, models: list[str | None], params: SamplingParams,
                 report: Callable[[Progress], None], report_interval: float = 0.05):
        self.engine = engine
        self.models = models
        self.params = params
        self.report = report
        self.report_interval = report_interval
        self._prompts: queue.Queue[tuple[int, str]] = queue.Queue()
        self._stop = threading.Event()
        self._round_ids = 0

    def submit(self, prompt: str) -> int:
        self._round_ids += 1
        self._prompts.put((self._round_ids, prompt))
        return self._round_ids

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                round_id, prompt = self._prompts.get(timeout=0.1)
            except queue.Empty:
                continue
            if not self._prompts.empty():
                continue  # only the newest of several queued prompts runs
            try:
                self._run_round(round_id, prompt)
            except Exception as e:  # keep the UI alive and say what went wrong
                self.report(Progress(round_id, done=True, error=f"{type(e).__name__}: {e}"))

    def _add_requests(self, prompt: str) -> dict[str, int]:
        """request id -> pane index; nothing stays queued if any request is refused."""
        ids: dict[str, int] = {}
        try:
            tokens = prompt_ids(self.engine, prompt)
            for pane, lora in enumerate(self.models):
                ids[self.engine.add_request(tokens, self.params, lora)] = pane
        except PunicaError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return ids

    def _run_round(self, round_id: int, prompt: str) -> None:
        start = time.perf_counter()
        try:
            pending = self._add_requests(prompt)
        except PunicaError as e:
            self.report(Progress(round_id, done=True, error=str(e)))
            return
        progress, last_report = Progress(round_id), start
        try:
            while pending and not self._stop.is_set() and self._prompts.empty():
                self._step(pending, progress)
                now = time.perf_counter()
                progress.elapsed = now - start
                if not pending or now - last_report >= self.report_interval:
                    progress.done = not pending
                    self.report(progress)
                    progress, last_report = progress.carry(), now
        finally:
            for rid in pending:  # interrupted by a new prompt, by stop, or by an error
                self.engine.abort(rid)

    def _step(self, pending: dict[str, int], progress: Progress) -> None:
        outputs = self.engine.step()
        for out in outputs:
            pane = pending.get(out.request_id)
            if pane is None:
                continue
            progress.deltas[pane] = progress.deltas.get(pane, "") + out.new_text
            progress.pane_tokens[pane] = len(out.token_ids)
            progress.tokens += len(out.new_token_ids)
            if out.finished:
                progress.finished[pane] = out.finish_reason or "stop"
                del pending[out.request_id]
        # the batch that just ran: those still running plus those it finished
        progress.batch_size = self.engine.num_running + sum(out.finished for out in outputs)
        progress.peak_batch_size = max(progress.peak_batch_size, progress.batch_size)
