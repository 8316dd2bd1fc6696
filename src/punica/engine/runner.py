"""Turns a scheduled step into one Batch, runs the model and samples one token per finished chunk."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from punica.engine.json_mode import NoTokenError
from punica.engine.request import Sequence, Status, TokenLogprobs
from punica.lora.plan import make_plan, segments, token_slots
from punica.model.batch import Batch
from punica.model.llama import LlamaModel
from punica.ops.attention import AttentionMeta
from punica.ops.sampling import add_logit_bias, apply_penalties, sample_torch, to_device, token_logprobs


@dataclass
class HostBatch:
    """A step's metadata as Python lists, before it goes to the device (eagerly or into graph buffers)."""

    ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    cu_q: list[int]
    kv_lens: list[int]
    block_tables: list[list[int]]
    logits_indices: list[int]
    seq_slots: list[int]
    seq_tokens: list[int]
    has_pending: bool = False  # some ids are placeholders for tokens the previous step samples on the device
    # (work index, first position, count) of prompt positions whose logits prompt logprobs need: their rows
    # follow the sampled ones in logits_indices, in this order
    prompt_rows: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.seq_tokens)

    @functools.cached_property
    def segments(self) -> tuple[list[int], list[int]]:
        """(indptr, slots) of the runs of sequences sharing an adapter (plan.segments), once the batch is built:
        the graph runner reads them twice a step (choosing the graph, writing its work list)."""
        return segments(self.seq_slots, self.seq_tokens)


def host_batch(work: list[tuple[Sequence, int]], block_size: int) -> HostBatch:
    """`work` must be ordered by adapter slot (see `order_by_slot`)."""
    hb = HostBatch([], [], [], [0], [], [], [], [], [])
    extra = []
    for i, (seq, n) in enumerate(work):
        start, end = seq.num_computed, seq.num_computed + n
        if seq.prompt_logprobs is not None and start < len(seq.prompt_ids) - 1:  # the last: a sampled row
            count = min(end, len(seq.prompt_ids) - 1) - start
            hb.prompt_rows.append((i, start, count))
            extra += range(hb.cu_q[-1], hb.cu_q[-1] + count)
        hb.ids += seq.tokens[start:end]
        if seq.rope_long is None:
            hb.positions += range(start, end)
        else:  # the rope table's row of each position: longrope's long-context rows from rope_long[0] on
            first, rows = seq.rope_long
            hb.positions += (p + rows if p >= first else p for p in range(start, end))
        hb.slot_mapping += [seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        hb.cu_q.append(hb.cu_q[-1] + n)
        hb.kv_lens.append(end)
        hb.block_tables.append(seq.block_table)
        if end == len(seq.tokens):
            hb.logits_indices.append(hb.cu_q[-1] - 1)
        hb.seq_slots.append(seq.slot)
        hb.seq_tokens.append(n)
        hb.has_pending |= seq.num_pending > 0
    hb.logits_indices += extra
    return hb


def resolve_pending(ids: torch.Tensor, previous: torch.Tensor | None) -> None:
    """Replace placeholder ids (-1 - row) in place by row `row` of the previous step's sampled tokens,
    which are still on the device: the step after it is launched without waiting for them."""
    if previous is None:
        raise RuntimeError("a step reads tokens of a previous step that is not in flight")
    rows = (-1 - ids).clamp_(min=0)
    torch.where(ids < 0, previous.index_select(0, rows), ids, out=ids)


def to_device_batch(hb: HostBatch, slot_rank: torch.Tensor, device: torch.device) -> Batch:
    """Pack every int field into one pinned host buffer and move it with a single copy."""
    indptr, seg_slots = hb.segments
    token_slot = token_slots(hb.seq_slots, hb.seq_tokens)
    width = max(len(t) for t in hb.block_tables)
    tables = [b for t in hb.block_tables for b in (t + [0] * (width - len(t)))]
    fields = [hb.ids, hb.positions, hb.slot_mapping, hb.logits_indices, hb.cu_q, hb.kv_lens, tables,
              indptr, seg_slots, token_slot]
    flat = to_device([v for f in fields for v in f], device, torch.int64)
    parts = flat.split([len(f) for f in fields])
    ids, pos, slot_mapping, logits_idx = parts[:4]
    cu_q, kv_lens, tables_t, indptr_t, seg_slot_t, token_slot_t = (p.to(torch.int32) for p in parts[4:])
    attn = AttentionMeta(cu_q=cu_q, kv_lens=kv_lens, block_tables=tables_t.view(len(hb.kv_lens), width),
                         max_q_len=max(hb.seq_tokens), max_kv_len=max(hb.kv_lens), host_cu_q=hb.cu_q,
                         host_kv_lens=hb.kv_lens)
    lora = make_plan(indptr, seg_slots, indptr_t, seg_slot_t, token_slot_t)
    return Batch(input_ids=ids, positions=pos, slot_mapping=slot_mapping, attn=attn, lora=lora,
                 slot_rank=slot_rank, logits_indices=logits_idx)


@dataclass
class InFlight:
    """A launched step: the sequences it samples a token for (in row order) and those tokens, on the device
    and on their way to a pinned host buffer (`ready` marks their arrival); `host_logprobs`, when some of
    them asked for log-probabilities: token_logprobs' three tensors, on their way to the host too."""

    seqs: list[Sequence]
    device_tokens: torch.Tensor
    host_tokens: torch.Tensor
    ready: torch.cuda.Event | None
    host_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # prompt logprobs computed by the step: (sequence, first position, count), the prompt tokens whose
    # logprobs they are (each position's next), and token_logprobs' tensors
    prompt_rows: list[tuple[Sequence, int, int]] = dataclasses.field(default_factory=list)
    prompt_targets: list[int] = dataclasses.field(default_factory=list)
    host_prompt_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def tokens(self) -> list[int]:
        """The sampled tokens, waiting for the device if need be (the step's only host synchronization)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host_tokens[:len(self.seqs)].tolist()

    def logprobs(self, tokens: list[int]) -> list[TokenLogprobs | None]:
        """Per row, the token's log-probabilities if its sequence asked for them (after `tokens()`)."""
        if self.host_logprobs is None:
            return [None] * len(self.seqs)
        return _entries(self.host_logprobs, tokens, [seq.params.logprobs for seq in self.seqs])

    def fill_prompt_logprobs(self) -> None:
        """Write the step's prompt logprobs into their sequences (after `tokens()`): the logprob of prompt
        token p + 1 given those up to p, for each position p the step computed."""
        if self.host_prompt_logprobs is None:
            return
        tops = [seq.params.prompt_logprobs for seq, _, count in self.prompt_rows for _ in range(count)]
        entries = _entries(self.host_prompt_logprobs, self.prompt_targets, tops)
        start = 0
        for seq, first, count in self.prompt_rows:
            seq.prompt_logprobs[first + 1:first + count + 1] = entries[start:start + count]
            start += count


def _entries(host: tuple[torch.Tensor, torch.Tensor, torch.Tensor], tokens: list[int],
             tops: list[int | None]) -> list[TokenLogprobs | None]:
    """TokenLogprobs of each row of token_logprobs' host tensors, with its `tops` most likely tokens (None:
    the row's sequence asked for none)."""
    chosen, values, ids = (t.tolist() for t in host)
    return [None if k is None else TokenLogprobs(token, chosen[row], tuple(zip(ids[row], values[row]))[:k])
            for row, (token, k) in enumerate(zip(tokens, tops))]


def masked(seq: Sequence) -> bool:
    """Whether seq's next draw is masked by its grammar: it has one, and its output is not free text for good (an
    "auto" reply that is no tool call: TokenGrammar.free), which needs neither a mask nor the step before."""
    return seq.grammar is not None and not seq.grammar.free(seq.grammar_state)


class ModelRunner:
    """Runs steps eagerly, or through `graphs` (a CudaGraphRunner) for the steps it can take. A step is
    launched without waiting for the one before it: token ids it needs from that step are read on the
    device (see `resolve_pending`)."""

    def __init__(self, model: LlamaModel, slot_rank: torch.Tensor, block_size: int, device: torch.device,
                 max_seqs: int, graphs=None, eos_ids: tuple[int, ...] = ()):
        self.model = model
        self.eos_ids = eos_ids  # what min_tokens keeps from being drawn early, with each request's stop_token_ids
        self.slot_rank = slot_rank
        self.block_size = block_size
        self.device = device
        self.graphs = graphs
        self._generators: dict[str, torch.Generator] = {}
        self._counts = TokenCounts()  # penalized requests' generated tokens
        # two pinned buffers for sampled tokens, alternating: one step in flight while the next launches
        cuda = device.type == "cuda"
        self._host_tokens = [torch.zeros(max_seqs, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self._flip = 0

    def build_batch(self, work: list[tuple[Sequence, int]]) -> Batch:
        return to_device_batch(host_batch(work, self.block_size), self.slot_rank, self.device)

    def forward(self, work: list[tuple[Sequence, int]],
                previous: torch.Tensor | None = None) -> tuple[torch.Tensor, HostBatch]:
        """(logits, the step's HostBatch): logits of every sequence whose chunk reaches its end, in `work`
        order, then those of the prompt positions whose logprobs are asked for (HostBatch.prompt_rows; such
        steps run eagerly). `previous`: the device tokens of the step in flight, which placeholder ids refer to."""
        hb = host_batch(work, self.block_size)
        key = self.graphs.key(hb) if self.graphs is not None and not hb.prompt_rows else None
        if key is not None:
            return self.graphs.run(hb, previous, key), hb
        batch = to_device_batch(hb, self.slot_rank, self.device)
        if hb.has_pending:
            resolve_pending(batch.input_ids, previous)
        return self.model(batch), hb

    def launch(self, work: dict[Sequence, int], previous: InFlight | None,
               read_previous: Callable[[], None] | None = None) -> InFlight:
        """Launch one step: the model, then sampling, on the device; the host does not wait. Each sequence
        advances by its work and, if its chunk reaches its end, gets a placeholder for the token sampled.

        A constrained (JSON-mode) sequence's mask needs the token `previous` drew for it. Then, once the model
        is launched, `read_previous()` reads that step (which the device finishes before this one's model) and
        advances the grammars; the host waits while the device runs this step's model, and sampling follows."""
        ordered = order_by_slot(work)
        logits, hb = self.forward(ordered, previous.device_tokens if previous is not None else None)
        done = [seq for seq, n in ordered if seq.num_computed + n == len(seq.tokens)]
        waiting = any(masked(seq) and seq.num_pending for seq in done)
        for seq, n in ordered:
            seq.num_computed += n
        for row, seq in enumerate(done):
            seq.tokens.append(-1 - row)
            seq.num_pending += 1
        if waiting and read_previous is not None:
            read_previous()  # may finish some of `done`: their rows are drawn unmasked and dropped (sample)
        prompt_rows = [(ordered[i][0], first, count) for i, first, count in hb.prompt_rows]
        prompt_targets, prompt_logprobs = [], None
        if prompt_rows:  # their logits follow the sampled rows'
            logits, prompt_logits = logits[:len(done)], logits[len(done):]
            prompt_targets = [t for seq, first, n in prompt_rows for t in seq.prompt_ids[first + 1:first + n + 1]]
            prompt_logprobs = token_logprobs(prompt_logits, to_device(prompt_targets, self.device, torch.int64),
                                             max(seq.params.prompt_logprobs for seq, _, _ in prompt_rows))
        tokens = self.sample(logits, done) if done else torch.zeros(0, dtype=torch.int64, device=self.device)
        asked = [s.params.logprobs for s in done if s.params.logprobs is not None]
        logprobs = token_logprobs(logits, tokens, max(asked)) if asked else None
        host, ready = tokens, None
        if self.device.type == "cuda":
            host = self._host_tokens[self._flip]
            self._flip ^= 1
            host[:len(done)].copy_(tokens, non_blocking=True)
            # a few KB, and only for requests that ask: fresh pinned buffers
            logprobs, prompt_logprobs = (None if t is None else tuple(x.to("cpu", non_blocking=True) for x in t)
                                         for t in (logprobs, prompt_logprobs))
            ready = torch.cuda.Event()
            ready.record()
        return InFlight(done, tokens, host, ready, logprobs, prompt_rows, prompt_targets, prompt_logprobs)

    @staticmethod
    def _mask(seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        """The tokens seq's grammar allows next; where none is (a vocabulary that cannot spell what the grammar
        asks for), any, and seq.grammar_error says why: the engine fails that request alone when it reads the row."""
        try:
            return seq.grammar.mask(seq.grammar_state, logits.device)
        except NoTokenError as e:
            seq.grammar_error = str(e)
            return torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row; penalized requests' counts (TokenCounts) gain the tokens drawn. Rows of finished
        sequences (a JSON-mode read finished them mid-launch) are drawn without their grammar, generator or counts:
        their tokens are dropped."""
        live = [s.status is not Status.FINISHED for s in seqs]
        params = [s.params for s in seqs]
        gens = [self._generator(s) if ok else None for s, ok in zip(seqs, live)]
        biases = [(p.logit_bias or ()) + self._held_back(s, logits.shape[1]) for s, p in zip(seqs, params)]
        if any(biases):  # a new tensor: logprobs report the model's own logits
            logits = add_logit_bias(logits, biases)
        counted = [row for row, p in enumerate(params) if p.penalizes and live[row]]
        if counted:
            counts = self._counts
            rows = counts.rows([seqs[r] for r in counted], logits.shape[1], logits.device)
            picked = to_device(counted, logits.device, torch.int64)
            penalized = apply_penalties(logits.index_select(0, picked), counts.buf.index_select(0, rows),
                                        counts.in_prompt.index_select(0, rows),
                                        [params[r].presence_penalty for r in counted],
                                        [params[r].frequency_penalty for r in counted],
                                        [params[r].repetition_penalty for r in counted])
            logits = logits.index_copy(0, picked, penalized)
        constrained = [row for row, s in enumerate(seqs) if masked(s) and live[row]]
        if constrained:  # last: the mask has the final word (json_mode.py)
            at = to_device(constrained, logits.device, torch.int64)
            masks = torch.stack([self._mask(seqs[r], logits) for r in constrained])
            logits = logits.index_copy(0, at, logits.index_select(0, at).masked_fill(~masks, -math.inf))
        tokens = sample_torch(logits, [p.temperature for p in params], [max(p.top_k, 0) for p in params],
                              [p.top_p for p in params], gens, [p.min_p for p in params])
        if counted:  # counted on the device at once: the next step's draw sees it before the host does
            self._counts.add(rows, tokens.index_select(0, picked))
        return tokens

    def _held_back(self, seq: Sequence, vocab: int) -> tuple[tuple[int, float], ...]:
        """(token, -inf) for the tokens of the vocabulary that would end seq's output, while this draw (its
        placeholder is the last token) is among its first min_tokens."""
        p = seq.params
        if len(seq.tokens) - len(seq.prompt_ids) > p.min_tokens:
            return ()
        ends = {*p.stop_token_ids, *(() if p.ignore_eos else self.eos_ids)}
        return tuple((t, -math.inf) for t in sorted(ends) if t < vocab)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.temperature == 0:
            return None
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.params.seed)
            self._generators[seq.request_id] = gen
        return gen

    def forget(self, seq: Sequence) -> None:
        self._generators.pop(seq.request_id, None)
        self._counts.free(seq.request_id)


class TokenCounts:
    """How often each penalized request has generated each token, and which tokens its prompt holds, on the
    device: one [V] float row (`buf`) and one [V] bool row (`in_prompt`) per request, kept through preemption,
    freed when it finishes, grown by doubling as more requests need one. Counting on the device right after
    each draw lets the next step's penalties see tokens the host reads only a step later."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.in_prompt: torch.Tensor | None = None
        self._rows: dict[str, int] = {}
        self._free: list[int] = []

    def rows(self, seqs: list[Sequence], vocab: int, device: torch.device) -> torch.Tensor:
        """The rows of these requests (new ones zeroed, their prompt's tokens marked), as a device tensor."""
        for seq in seqs:
            if seq.request_id not in self._rows:
                if not self._free:
                    self._grow(vocab, device)
                row = self._rows[seq.request_id] = self._free.pop()
                if seq.params.repetition_penalty != 1.0:
                    self.in_prompt[row].index_fill_(0, to_device(seq.prompt_ids, device, torch.int64), True)
        return to_device([self._rows[seq.request_id] for seq in seqs], device, torch.int64)

    def add(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        self.buf.index_put_((rows, tokens), torch.ones_like(tokens, dtype=self.buf.dtype), accumulate=True)

    def free(self, request_id: str) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            self.buf[row].zero_()
            self.in_prompt[row].zero_()
            self._free.append(row)

    def _grow(self, vocab: int, device: torch.device) -> None:
        old = 0 if self.buf is None else self.buf.shape[0]
        new = torch.zeros(max(2 * old, 8), vocab, dtype=torch.float32, device=device)
        in_prompt = torch.zeros(new.shape, dtype=torch.bool, device=device)
        if self.buf is not None:
            new[:old], in_prompt[:old] = self.buf, self.in_prompt
        self.buf, self.in_prompt = new, in_prompt
        self._free += range(new.shape[0] - 1, old - 1, -1)


def order_by_slot(work: dict[Sequence, int]) -> list[tuple[Sequence, int]]:
    """Sequences sorted by adapter slot (stable), so each adapter's tokens form one segment."""
    return sorted(work.items(), key=lambda item: item[0].slot)
