"""Continuous batching. Each step: running sequences (decodes first, then unfinished prefills) under a
token budget, then waiting ones in arrival order while KV blocks (for the whole prompt), adapter slots
and `max_num_seqs` allow. When KV blocks run out the newest running sequence is preempted: its blocks are
freed and it is recomputed later. Nothing is dropped. Pure Python: no torch."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from punica.config import SchedulerConfig
from punica.engine.request import Sequence, Status
from punica.kv.block_manager import BlockManager, block_keys

MAX_BYPASS = 64  # later requests that may start while the oldest waits for an adapter slot
PREFETCH_AHEAD = 32  # waiting requests whose adapters are read from disk ahead of admission


class AdapterSlots(Protocol):
    """What the scheduler needs of adapter residency (the engine's AdapterManager)."""

    def can_acquire(self, name: str) -> bool: ...
    def is_active(self, name: str) -> bool: ...
    def ready(self, name: str) -> bool: ...
    def prefetch(self, name: str) -> None: ...
    def read_error(self, name: str) -> Exception | None: ...
    def acquire(self, name: str) -> int: ...
    def release(self, name: str) -> None: ...


@dataclass
class ScheduledStep:
    """Sequences to run this step with how many of their uncomputed tokens each processes."""

    work: dict[Sequence, int] = field(default_factory=dict)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # their adapter could not be read


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager, adapters: AdapterSlots,
                 max_prefetch_loras: int = PREFETCH_AHEAD):
        self.cfg = cfg
        self.blocks = blocks
        self.adapters = adapters
        # adapters read ahead at once: no more than the CPU cache holds, or finished reads evict each other
        # (the head's too) before anyone uses them, and the head may wait forever (see _prefetch)
        self.max_prefetch_loras = max_prefetch_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._logprob_rows = cfg.max_prompt_logprob_tokens  # left in the step being scheduled (see _chunk)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.cfg.max_num_batched_tokens
        self._logprob_rows = self.cfg.max_prompt_logprob_tokens  # this step's, shared by prompt_logprobs requests
        for seq in sorted(self.running, key=lambda s: (s.num_remaining > 1, s.arrival)):
            if seq.status is not Status.RUNNING or seq.finishing or budget == 0:
                continue
            n = self._chunk(seq, budget)
            if not n:
                continue
            if seq.rope_long is not None and 0 < seq.rope_long[0] < seq.num_computed + n:
                self.preempt(seq)  # longrope: it outgrows the pretraining length, and is recomputed (preempt)
                continue
            if self.blocks.extra_blocks(seq.block_table, seq.num_computed + n):  # most decodes fit their blocks
                budget += self._make_room(seq, n, step)  # preempted sequences give back what they were given
                if seq.status is not Status.RUNNING:
                    continue
                self.blocks.grow(seq.block_table, seq.num_computed + n)
            step.work[seq] = n
            budget -= n
            self._take_logprob_rows(seq, n)
        self._admit_waiting(step, budget)
        return step

    def _admit_waiting(self, step: ScheduledStep, budget: int) -> None:
        """First come, first served, with one exception: while the oldest waiting request waits only for an
        adapter (a free slot, or its weights from disk, read in the background meanwhile), later requests
        that need no new slot (base model, or an adapter already running) may start, up to MAX_BYPASS
        times, so a busy or slow adapter does not stall everyone else. A request whose next prompt block
        another one is computing in this step waits for the cache (see _computing) while later
        ones may start. Requests whose adapter failed to read leave the queue in `step.failed`."""
        self._prefetch(step)
        if not self.waiting or budget == 0:
            return
        reserved = sum(self._prefill_blocks(s) for s in self.running)  # once a step, only with someone waiting
        blocked: Sequence | None = None
        computing: set[tuple] | None = None  # see _computing: built once a step, if a prompt misses the cache
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.cfg.max_num_seqs:
                return
            if blocked is not None and blocked.num_bypassed >= MAX_BYPASS:
                return
            if seq.num_pending:  # preempted while its last token was on the device: next step
                return
            if seq.lora is not None and not self.adapters.ready(seq.lora_key):  # read in turn (_prefetch)
                if blocked is None:
                    if seq.num_bypassed >= MAX_BYPASS:
                        return  # it has waited long enough: nobody overtakes it any more
                    blocked = seq
                continue
            if blocked is not None and not (seq.lora is None or self.adapters.is_active(seq.lora_key)):
                continue
            if seq.lora is not None and not self.adapters.can_acquire(seq.lora_key):
                if blocked is None and seq.num_bypassed < MAX_BYPASS:
                    blocked = seq
                    continue
                return
            if not self._chunk(seq, budget):
                continue  # its prompt's logprobs wait for this step's rows to be free
            keys = self._cacheable_keys(seq)
            hits, idle = self.blocks.cached_prefix(keys)
            if hits < len(keys):
                computing = self._computing() if computing is None else computing
                if keys[hits] in computing:
                    continue  # see _computing
            n = self._try_admit(seq, budget, reserved, keys, hits, idle)
            if not n:
                return  # out of KV blocks: nobody overtakes
            reserved += self._prefill_blocks(seq)
            if computing is not None:
                computing.update(seq.block_keys[seq.num_cached_blocks:])
            self.waiting.remove(seq)
            step.work[seq] = n
            budget -= n
            self._take_logprob_rows(seq, n)
            if blocked is not None:
                blocked.num_bypassed += 1

    def _prefetch(self, step: ScheduledStep) -> None:
        """Start background reads for the adapters of the first waiting requests, in queue order, up to
        `max_prefetch_loras` distinct ones besides those running (a finished read enters the bounded CPU
        cache: reading more would evict the head's adapter before it starts). Requests whose adapter failed
        to read leave the queue in `step.failed`."""
        errors: dict[str, Exception] = {}
        keys: set[str] = set()
        for seq in list(itertools.islice(self.waiting, PREFETCH_AHEAD)):  # reads start while the batch is full
            key = seq.lora_key
            if seq.lora is None or self.adapters.is_active(key):
                continue
            if key not in keys and len(keys) >= self.max_prefetch_loras:
                continue
            keys.add(key)
            if self.adapters.ready(key):
                continue
            error = errors.get(key) or self.adapters.read_error(key)
            if error is not None:
                errors[key] = error
                self.waiting.remove(seq)
                step.failed.append((seq, error))
            else:
                self.adapters.prefetch(key)

    def _make_room(self, seq: Sequence, n: int, step: ScheduledStep) -> int:
        """Preempt the newest running sequences until `seq` can grow by `n` tokens (or `seq` itself had to go);
        returns the tokens this step had scheduled for the preempted ones."""
        given_back = 0
        while not self.blocks.can_grow(seq.block_table, seq.num_computed + n):
            victim = max(self.running, key=lambda s: s.arrival)
            self.preempt(victim)
            given_back += step.work.pop(victim, 0)
            step.preempted.append(victim)
            if victim is seq:
                break
        return given_back

    def _prefill_blocks(self, seq: Sequence) -> int:
        """Blocks a running sequence still needs for the prompt it has not computed (a decode's next block
        is the one free block kept per running sequence)."""
        return self.blocks.extra_blocks(seq.block_table, len(seq.tokens)) if seq.num_remaining > 1 else 0

    def _try_admit(self, seq: Sequence, budget: int, reserved: int, keys: list[tuple], hits: int, idle: int) -> int:
        """Move `seq` to running and return its first chunk's size, or 0 if its KV does not fit now: the
        blocks of its whole prompt (for a preempted sequence, of every token it has), beside the `reserved`
        blocks that running prefills still need and one free block per running sequence for its next
        decode. Admitting a prompt whose later chunks do not fit would preempt someone (or it)
        before its first token, and recomputing long prompts back and forth thrashes. `keys`: its
        `_cacheable_keys`, and `cached_prefix` of them: `hits` cached, `idle` of those referenced by nobody,
        whose sharing uses up free blocks."""
        need = self.blocks.extra_blocks(seq.block_table, len(seq.tokens)) - hits + idle
        if need + reserved + len(self.running) > self.blocks.num_free:
            return 0
        if keys:
            seq.num_computed = self.blocks.take_cached(seq.block_table, keys, hits)
            seq.num_cached_blocks = seq.num_computed // self.blocks.block_size
            if not seq.num_preemptions:  # what a recomputed request takes back was its own work
                seq.num_cached_tokens = seq.num_computed
        n = self._chunk(seq, budget)
        if seq.lora is not None:
            seq.slot = self.adapters.acquire(seq.lora_key)
        self.blocks.grow(seq.block_table, seq.num_computed + n)
        seq.status = Status.RUNNING
        self.running.append(seq)
        return n

    def _scores_prompt(self, seq: Sequence) -> bool:
        """Whether `seq`'s next chunk computes prompt positions whose logprobs it asks for."""
        return seq.params.prompt_logprobs is not None and seq.num_computed < len(seq.prompt_ids) - 1

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens `seq` may compute this step: its remaining ones under the budget, and if they are prompt
        positions whose logprobs it wants, under the step's rows left for those (possibly 0)."""
        n = min(seq.num_remaining, budget)
        return min(n, self._logprob_rows) if self._scores_prompt(seq) else n

    def _take_logprob_rows(self, seq: Sequence, n: int) -> None:
        if self._scores_prompt(seq):
            self._logprob_rows -= min(n, len(seq.prompt_ids) - 1 - seq.num_computed)

    def _computing(self) -> set[tuple]:
        """Prefix-cache keys of the blocks running sequences have been given to compute and not yet cached. A
        waiting request whose first uncached prompt block is one of them (the `n` choices of one prompt, a burst
        of requests with one system prompt) waits a step and takes that block, and those after it as they are
        computed, from the cache instead of computing them again beside it. A running prefill is scheduled
        before admissions, so the wait is a step each."""
        return {key for s in self.running for key in s.block_keys[s.num_cached_blocks:]}

    def _cacheable_keys(self, seq: Sequence) -> list[tuple]:
        """Prefix-cache keys of the blocks `seq` may take from the cache (its prompt's, and a recomputed
        sequence's generated ones): none unless caching, or if it wants its prompt's logprobs (computed, not
        read); never its last token, whose logits it samples from."""
        if not self.blocks.caching or seq.num_computed or seq.params.prompt_logprobs is not None:
            return []
        return self._keys(seq, (len(seq.tokens) - 1) // self.blocks.block_size)

    def _keys(self, seq: Sequence, blocks: int) -> list[tuple]:
        """The keys of `seq`'s first `blocks` blocks (all of whose tokens are known), built once."""
        if len(seq.block_keys) < blocks:
            block_keys(seq.cache_namespace, seq.tokens, self.blocks.block_size, seq.block_keys, blocks)
        return seq.block_keys[:blocks]

    def launched(self, work: dict[Sequence, int]) -> None:
        """A step with this work was launched: cache the full blocks whose KV is computed by now and whose
        tokens are known (not placeholders of tokens still being sampled), for requests that start with the
        same tokens on the same adapter (their steps run after this one)."""
        if not self.blocks.caching:
            return
        size = self.blocks.block_size
        for seq in work:
            if seq.status is not Status.RUNNING:  # finished while launching (a JSON-mode read): blocks freed
                continue
            if seq.num_computed < (seq.num_cached_blocks + 1) * size:  # most decodes: no block completed
                continue
            full = min(seq.num_computed, seq.num_known) // size
            if full > seq.num_cached_blocks:
                self.blocks.register(seq.block_table, self._keys(seq, full), seq.num_cached_blocks)
                seq.num_cached_blocks = full

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s KV and put it back at the head of the queue; it will be recomputed, with longrope's
        long-context factors throughout if it has outgrown the pretraining length."""
        self._release(seq)
        seq.num_computed = 0
        if seq.rope_long is not None and 0 < seq.rope_long[0] < len(seq.tokens):
            seq.use_long_rope()
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.RUNNING:
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_cached_blocks = 0
        if seq.lora is not None:
            self.adapters.release(seq.lora_key)
            seq.slot = 0
