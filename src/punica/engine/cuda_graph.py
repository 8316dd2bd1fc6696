"""Decode steps replayed as CUDA graphs, one per batch-size bucket and per "any adapter in the batch".

The graphs read fixed-capacity buffers; a step copies its metadata into them and pads the rest with
sentinels the kernels skip: KV slot -1 (not stored), context length 0 (no attention), adapter slot 0 (no
LoRA). Adapters load into existing slots, so a graph stays valid as adapters come and go.
"""

from __future__ import annotations

import torch

from punica.engine.runner import HostBatch
from punica.model.batch import Batch
from punica.model.llama import LlamaModel
from punica.ops.attention import AttentionMeta
from punica.ops.sgmv import SegmentPlan


def batch_buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


class StaticBuffers:
    """Pinned host mirrors and device buffers: int64 [3, B] (ids, positions, KV slots) and int32
    [B+1 | B | B | B*max_blocks] (cu_q, context lengths, per-token adapter slots, block tables)."""

    def __init__(self, max_batch: int, max_blocks: int, device: torch.device):
        self.B, self.max_blocks = max_batch, max_blocks
        self.host64 = torch.zeros(3, max_batch, dtype=torch.int64).pin_memory()
        self.host32 = torch.zeros(3 * max_batch + 1 + max_batch * max_blocks, dtype=torch.int32).pin_memory()
        self.dev64 = torch.zeros_like(self.host64, device=device)
        self.dev32 = torch.zeros_like(self.host32, device=device)
        self.rows = torch.arange(max_batch, device=device)  # logits rows: a graph reads it at every replay

    def views32(self, buf: torch.Tensor):
        B = self.B
        cu_q, kv_lens, token_slot, tables = buf.split([B + 1, B, B, B * self.max_blocks])
        return cu_q, kv_lens, token_slot, tables.view(B, self.max_blocks)

    def fill(self, hb: HostBatch, b: int) -> None:
        """Write a decode step of n <= b sequences, padded to b with sentinels, and copy it to the device."""
        n = len(hb.kv_lens)
        pad = b - n
        self.host64[:, :b] = torch.tensor([hb.ids + [0] * pad, hb.positions + [0] * pad, hb.slot_mapping + [-1] * pad])
        cu_q, kv_lens, token_slot, tables = self.views32(self.host32)
        cu_q[:b + 1] = torch.arange(b + 1, dtype=torch.int32)
        kv_lens[:b] = torch.tensor(hb.kv_lens + [0] * pad, dtype=torch.int32)
        token_slot[:b] = torch.tensor(hb.seq_slots + [0] * pad, dtype=torch.int32)
        width = max(len(t) for t in hb.block_tables)
        tables[:n, :width] = torch.tensor([t + [0] * (width - len(t)) for t in hb.block_tables], dtype=torch.int32)
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32.copy_(self.host32, non_blocking=True)

    def clear(self) -> None:
        """Every row a sentinel (used while capturing)."""
        self.host64.zero_()
        self.host64[2] = -1
        self.host32.zero_()
        self.dev64.copy_(self.host64)
        self.dev32.copy_(self.host32)


class CudaGraphRunner:
    def __init__(self, model: LlamaModel, slot_rank: torch.Tensor, max_batch: int, max_model_len: int,
                 block_size: int, device: torch.device):
        self.model = model
        self.slot_rank = slot_rank
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch)
        self.buf = StaticBuffers(max_batch, -(-max_model_len // block_size), device)
        # (bucket, with_lora) -> (graph, its output, the Batch it reads): every tensor a graph touches must
        # stay alive as long as the graph, or its memory is reused under it
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, Batch]] = {}

    def _batch(self, b: int, with_lora: bool) -> Batch:
        ids, positions, slot_mapping = self.buf.dev64[:, :b]
        cu_q, kv_lens, token_slot, tables = self.buf.views32(self.buf.dev32)
        attn = AttentionMeta(cu_q=cu_q[:b + 1], kv_lens=kv_lens[:b], block_tables=tables[:b], max_q_len=1,
                             max_kv_len=self.max_model_len, host_cu_q=list(range(b + 1)),
                             host_kv_lens=[self.max_model_len] * b)
        # one segment per token, so any mix of adapters fits the same graph; slot-0 tokens are skipped
        lora = SegmentPlan(seg_indptr=cu_q[:b + 1], seg_slot=token_slot[:b], token_slot=token_slot[:b],
                           max_seg_len=1, host_indptr=list(range(b + 1)), host_slot=[int(with_lora)] * b)
        return Batch(input_ids=ids, positions=positions, slot_mapping=slot_mapping, attn=attn, lora=lora,
                     slot_rank=self.slot_rank, logits_indices=self.buf.rows[:b])

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        self.buf.clear()
        for b in reversed(self.buckets):
            for with_lora in (True, False):
                batch = self._batch(b, with_lora)
                self.model(batch)  # warm up: compiles kernels, allocates lazily created buffers
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.model(batch)
                pool = graph.pool()
                self.graphs[(b, with_lora)] = (graph, out, batch)
        torch.cuda.synchronize()

    def can_run(self, hb: HostBatch) -> bool:
        return hb.is_decode and len(hb.kv_lens) <= self.buckets[-1] and bool(self.graphs)

    def run(self, hb: HostBatch) -> torch.Tensor:
        n = len(hb.kv_lens)
        b = next(b for b in self.buckets if b >= n)
        self.buf.fill(hb, b)
        graph, out, _ = self.graphs[(b, any(hb.seq_slots))]
        graph.replay()
        return out[:n]
