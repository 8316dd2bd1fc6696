"""Turns a scheduled step into one Batch, runs the model and samples one token per finished chunk."""

from __future__ import annotations

import torch

from punica.engine.request import Sequence
from punica.lora.plan import build_segment_plan
from punica.model.batch import Batch
from punica.model.llama import LlamaModel
from punica.ops.attention import AttentionMeta
from punica.ops.sampling import sample_torch


class ModelRunner:
    def __init__(self, model: LlamaModel, slot_rank: torch.Tensor, block_size: int, device: torch.device):
        self.model = model
        self.slot_rank = slot_rank
        self.block_size = block_size
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def build_batch(self, work: list[tuple[Sequence, int]]) -> Batch:
        """`work` must be ordered by adapter slot (see `order_by_slot`)."""
        ids, pos, slots, cu_q, kv_lens, logits_idx = [], [], [], [0], [], []
        bs = self.block_size
        for seq, n in work:
            start, end = seq.num_computed, seq.num_computed + n
            ids += seq.tokens[start:end]
            pos += range(start, end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            cu_q.append(cu_q[-1] + n)
            kv_lens.append(end)
            if end == len(seq.tokens):
                logits_idx.append(cu_q[-1] - 1)
        width = max(len(seq.block_table) for seq, _ in work)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in work]
        dev = self.device

        def tensor(values, dtype=torch.int32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        attn = AttentionMeta(cu_q=tensor(cu_q), kv_lens=tensor(kv_lens), block_tables=tensor(tables),
                             max_q_len=max(n for _, n in work), max_kv_len=max(kv_lens),
                             host_cu_q=cu_q, host_kv_lens=kv_lens)
        lora = build_segment_plan([seq.slot for seq, _ in work], [n for _, n in work], dev)
        return Batch(input_ids=tensor(ids, torch.int64), positions=tensor(pos, torch.int64),
                     slot_mapping=tensor(slots, torch.int64), attn=attn, lora=lora,
                     slot_rank=self.slot_rank, logits_indices=tensor(logits_idx, torch.int64))

    def run(self, work: dict[Sequence, int]) -> dict[Sequence, int]:
        """Run one step; returns the sampled next token of every sequence whose chunk reached its end."""
        ordered = order_by_slot(work)
        batch = self.build_batch(ordered)
        logits = self.model(batch)
        done = [seq for seq, n in ordered if seq.num_computed + n == len(seq.tokens)]
        if not done:
            return {}
        tokens = self.sample(logits, done)
        return dict(zip(done, tokens))

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        params = [s.params for s in seqs]
        gens = [self._generator(s) for s in seqs]
        out = sample_torch(logits, [p.temperature for p in params], [max(p.top_k, 0) for p in params],
                           [p.top_p for p in params], gens)
        return out.tolist()

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


def order_by_slot(work: dict[Sequence, int]) -> list[tuple[Sequence, int]]:
    """Sequences sorted by adapter slot (stable), so each adapter's tokens form one segment."""
    return sorted(work.items(), key=lambda item: item[0].slot)
