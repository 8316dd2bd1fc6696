"""Steps replayed as CUDA graphs: decode steps per batch-size bucket, and steps that mix prefill chunks with
decodes per token-count bucket, each with and without adapters in the batch.

The graphs read fixed-capacity buffers; a step copies its metadata into them and pads the rest with
sentinels the kernels skip: KV slot -1 (not stored), an empty query range and context length 0 (no
attention), adapter slot 0 (no LoRA). Decode graphs tile LoRA per token (one segment per token) and use
the split-K decode attention. Mixed graphs give the SGMV and prefill-attention kernels work lists cut on
the host (SegmentPlan.items, AttentionMeta.q_tiles), so their grids depend on the bucket alone, whatever
the step's segments and query lengths; their one-query sequences take the decode attention kernel, on the
main stream beside the prefill kernel's branch (attention.SPLIT_MIXED). With sgmv.TUNING["hybrid_graphs"]
(1: both kinds, 2: mixed only), LoRA is tiled with hybrid work lists instead: single tokens on the CUDA
cores (BGMV), longer segments in tensor-core row blocks. With sgmv.TUNING["sparse_decode"], each decode
bucket also has a "sparse" graph for steps whose sequences mostly share adapters: a hybrid list whose real
items the expand walks on a fixed grid (counts_items), chosen per step (CudaGraphRunner.key).
Adapters load into existing slots, so graphs stay valid as adapters come and go.

Until `capture` is called (CPU, tests) the runner runs the same padded batches eagerly.
"""

from __future__ import annotations

import time
from itertools import chain

import numpy as np
import torch

from punica.engine.runner import HostBatch, resolve_pending
from punica.lora.plan import hybrid_items, token_slots, work_items
from punica.model.batch import Batch
from punica.model.llama import LlamaModel
from punica.ops.attention import AttentionMeta, prefill_tile_rows, query_tiles
from punica.ops.sgmv import TUNING, SegmentPlan, hybrid_graphs, work_list_rows

MIN_MIXED_BUCKET = 64


def batch_buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


def item_capacity(t: int, mixed: bool, hybrid: bool, max_seqs: int, rows: int, single_max: int) -> tuple[int, int]:
    """(single-token items, row-block items) that a graph's work list of t tokens holds at most: a mixed
    graph (at most max_seqs sequences) or a decode graph (t sequences), on hybrid lists or not; (0, 0): a
    decode graph that tiles per token. Each segment adds at most one partial block of `rows`."""
    if not hybrid:
        return (0, _cdiv(t, rows) + max_seqs) if mixed else (0, 0)
    if mixed:
        return min(t, max_seqs * single_max), _cdiv(t, rows) + max_seqs
    return t, _cdiv(t, rows) + t // (single_max + 1)


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts mixed steps are padded to: multiples of MIN_MIXED_BUCKET up to 8 of them, then four
    buckets per doubling (a step pads by at most a quarter), then max_tokens. A graph's GEMMs, norms and
    activations run on every row of its bucket, and past about 256 tokens the GEMMs are compute-bound, so
    padding costs in proportion: with powers of two a 287-token step (a 256-token chunk among 31 decodes at
    Llama-2-7B's shapes) ran the 512-token graph."""
    out, t = [], MIN_MIXED_BUCKET
    while t < max_tokens:
        out.append(t)
        t += max(MIN_MIXED_BUCKET, (1 << (t.bit_length() - 1)) // 4)
    return out + [max_tokens]


# Decode graphs start attention programs longest context first (AttentionMeta.seq_order)
DECODE_ORDER = True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def counts_items(kind: str, max_batch: int) -> bool:
    """Whether a graph's work list carries how many of its items are real, so that the SGMV kernels walk
    those alone on fixed grids (TUNING["expand_persistent"], ["shrink_persistent"]): sparse decode graphs,
    and mixed graphs of at least TUNING["persistent_min_batch"] sequences, whose lists are mostly padding
    unless every sequence has its own adapter."""
    return kind == "sparse" or (kind == "mixed" and max_batch >= TUNING["persistent_min_batch"])


def is_sparse(indptr: list[int], single_max: int, fraction: float) -> bool:
    """Whether a decode step runs its bucket's sparse graph: at most `fraction` of its tokens are in segments
    (`indptr`: plan.segments' bounds) of at most `single_max` sharing an adapter (the hybrid list's single
    items), the rest in shared row blocks."""
    singles = sum(n for n in (b - a for a, b in zip(indptr, indptr[1:])) if n <= single_max)
    return singles <= fraction * indptr[-1]


class StaticBuffers:
    """Pinned host mirrors and device buffers of one step's metadata at capacity (T tokens, B sequences):
    int64 [4, T] (ids, positions, KV slots, logits rows) and int32 (cu_q [B+1], context lengths [B],
    per-token adapter slots [T], block tables [B, max_blocks], SGMV items [., 3] and how many of them are
    real [2], attention tiles [., 2], decode order [B]: the sequences by decreasing context)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, item_rows: int, tile_rows: int,
                 device: torch.device, hybrid: frozenset[str] = frozenset(), single_max: tuple[int, int] = (1, 1),
                 hybrid_decode_max: int = 0):
        self.T, self.B, self.max_blocks = max_tokens, max_seqs, max_blocks
        self.item_rows, self.tile_rows = item_rows, tile_rows
        self.hybrid = hybrid  # the graph kinds ("decode", "mixed") on hybrid lists
        self.decode_single_max, self.mixed_single_max = single_max  # their segments this short: single items
        self.hybrid_decode_max = hybrid_decode_max  # decode buckets at most this big use them too
        # a sparse graph's list (hybrid) holds at least what a decode graph's does
        items = max(sum(self.item_capacity(max_tokens, "mixed")), sum(self.item_capacity(max_seqs, "sparse")))
        self.sizes = dict(cu_q=max_seqs + 1, kv_lens=max_seqs, token_slot=max_tokens, tables=max_seqs * max_blocks,
                          items=3 * items, item_count=2, tiles=2 * self.tile_capacity(max_tokens), order=max_seqs)
        pin = device.type == "cuda"
        self.host64 = torch.zeros(4, max_tokens, dtype=torch.int64, pin_memory=pin)
        self.host32 = torch.zeros(sum(self.sizes.values()), dtype=torch.int32, pin_memory=pin)
        self.dev64 = torch.zeros_like(self.host64, device=device)
        self.dev32 = torch.zeros_like(self.host32, device=device)
        self.h = self.views(self.host32)
        self.d = self.views(self.dev32)
        # numpy views of the pinned host buffers: filling them from Python lists costs a third of torch.tensor's
        self.np64 = self.host64.numpy()
        self.np = {name: view.numpy() for name, view in self.h.items()}
        self._copied: torch.cuda.Event | None = None  # the last host -> device copy of these buffers

    def is_hybrid(self, kind: str, t: int) -> bool:
        """Whether graphs of this kind ("decode", "sparse", "mixed") and bucket t tile LoRA with hybrid work
        lists."""
        if kind == "mixed":
            return "mixed" in self.hybrid
        return kind == "sparse" or "decode" in self.hybrid or t <= self.hybrid_decode_max

    def item_capacity(self, t: int, kind: str) -> tuple[int, int]:
        """(single-token items, row-block items) the work list of a bucket of t tokens holds at most."""
        return item_capacity(t, kind == "mixed", self.is_hybrid(kind, t), self.B, self.item_rows,
                             self.single_max(kind))

    def single_max(self, kind: str) -> int:
        """Segments of at most this many tokens are single-token items in this kind of graph's hybrid lists."""
        return self.mixed_single_max if kind == "mixed" else self.decode_single_max

    def tile_capacity(self, t: int) -> int:
        return _cdiv(t, self.tile_rows) + self.B

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = dict(zip(self.sizes, buf.split(list(self.sizes.values()))))
        parts["tables"] = parts["tables"].view(self.B, self.max_blocks)
        return parts

    def write(self, hb: HostBatch, t: int, kind: str) -> None:
        """Write a step of n <= B sequences and len(hb.ids) <= t tokens for a graph of this kind, padded
        with sentinels, and copy it to the device. Rows past t and sequences past n keep stale values that
        no kernel reads."""
        if self._copied is not None:  # the previous step's copy must have read the host buffers (it has,
            self._copied.synchronize()  # in practice: it runs first in that step, which is in flight)
        n, m = len(hb.kv_lens), len(hb.ids)
        mixed = kind == "mixed"
        b = self.B if mixed else t
        h64, h = self.np64, self.np
        for row, values, pad in ((0, hb.ids, 0), (1, hb.positions, 0), (2, hb.slot_mapping, -1)):
            h64[row, :m] = values
            h64[row, m:t] = pad
        if mixed:  # logits rows of the sequences that finish a chunk; empty query ranges after the last
            h64[3, :len(hb.logits_indices)] = hb.logits_indices
            h64[3, len(hb.logits_indices):t] = 0
            h["cu_q"][:n + 1] = hb.cu_q
            h["cu_q"][n + 1:b + 1] = hb.cu_q[-1]
        else:  # a decode bucket: one token, one sequence, one logits row per row of the bucket
            h64[3, :t] = np.arange(t)
            h["cu_q"][:b + 1] = np.arange(b + 1)
        h["kv_lens"][:n] = hb.kv_lens
        h["kv_lens"][n:b] = 0
        if not mixed and DECODE_ORDER:  # longest contexts first: their attention programs do not form the tail
            h["order"][:b] = np.argsort(-h["kv_lens"][:b], kind="stable")
        self._write_tables(hb.block_tables)
        h["token_slot"][:m] = token_slots(hb.seq_slots, hb.seq_tokens)
        h["token_slot"][m:t] = 0
        n_single, n_block = self.item_capacity(t, kind)
        if n_single + n_block:
            indptr, slots = hb.segments
            # base-model tokens get (slot-0) items too: an overwriting expand writes their zeros (items_cover)
            if self.is_hybrid(kind, t):
                singles, blocks = hybrid_items(indptr, slots, self.item_rows, self.single_max(kind), base=True)
            else:
                singles, blocks = [], work_items(indptr, slots, self.item_rows, base=True)
            if len(singles) > 3 * n_single or len(blocks) > 3 * n_block:
                raise RuntimeError(f"work list over its capacity: {len(singles) // 3} single and "
                                   f"{len(blocks) // 3} block items for ({n_single}, {n_block})")
            items = h["items"]
            items[:len(singles)] = singles
            items[len(singles):3 * n_single] = 0
            items[3 * n_single:3 * n_single + len(blocks)] = blocks
            items[3 * n_single + len(blocks):3 * (n_single + n_block)] = 0
            h["item_count"][:] = len(singles) // 3, len(blocks) // 3
        if mixed:
            tiles = query_tiles(hb.cu_q, self.tile_rows)
            h["tiles"][:len(tiles)] = tiles
            h["tiles"][len(tiles):2 * self.tile_capacity(t)].reshape(-1, 2)[:] = (-1, 0)
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32.copy_(self.host32, non_blocking=True)
        if self.dev64.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _write_tables(self, tables: list[list[int]]) -> None:
        """Row i of the block tables = tables[i]; columns past its length keep stale values no kernel reads.
        One flat conversion and a scatter: a numpy call per row would cost more than all of it."""
        lengths = np.fromiter(map(len, tables), np.int64, len(tables))
        total = int(lengths.sum())
        flat = np.fromiter(chain.from_iterable(tables), np.int32, total)
        rows = np.repeat(np.arange(len(tables)), lengths)
        cols = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self.np["tables"][rows, cols] = flat

    def clear(self) -> None:
        """Every row a sentinel (used while capturing)."""
        self.host64.zero_()
        self.host64[2] = -1
        self.host32.zero_()
        self.h["tiles"].fill_(-1)
        self.h["order"].copy_(torch.arange(self.B))
        self.dev64.copy_(self.host64)
        self.dev32.copy_(self.host32)


class CudaGraphRunner:
    """Runs every step whose sizes fit a bucket from its captured graph; before `capture` (CPU, tests) it
    runs the same padded batches eagerly."""

    def __init__(self, model: LlamaModel, slot_rank: torch.Tensor, max_batch: int, max_tokens: int,
                 max_model_len: int, block_size: int, device: torch.device):
        self.model = model
        self.slot_rank = slot_rank
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch)
        self.token_buckets = token_buckets(max_tokens)
        tile_rows = prefill_tile_rows(model.config.head_dim, model.embed_tokens.weight.dtype, max_tokens)
        self.buf = StaticBuffers(max_tokens, max_batch, _cdiv(max_model_len, block_size), work_list_rows(),
                                 tile_rows, device, hybrid_graphs(),
                                 (max(1, TUNING["decode_single_max"]), max(1, TUNING["mixed_single_max"])),
                                 TUNING["hybrid_decode_max"])
        self.sparse_fraction = TUNING["sparse_decode"]  # 0: no sparse decode graphs
        # (kind, bucket, with_lora) -> (graph, its output, the Batch it reads): every tensor a graph touches
        # must stay alive as long as the graph, or its memory is reused under it
        self.graphs: dict[tuple[str, int, bool], tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None, Batch]] = {}
        self.capture_s, self.capture_bytes = 0.0, 0  # the last capture's wall time and device memory
        for b in self.buckets:
            for with_lora in (True, False):
                self.graphs[("decode", b, with_lora)] = (None, None, self._batch(b, with_lora, "decode"))
            if self.sparse_fraction:
                self.graphs[("sparse", b, True)] = (None, None, self._batch(b, True, "sparse"))
        for t in self.token_buckets:
            for with_lora in (True, False):
                self.graphs[("mixed", t, with_lora)] = (None, None, self._batch(t, with_lora, "mixed"))

    def _batch(self, t: int, with_lora: bool, kind: str) -> Batch:
        """The Batch a graph of this kind and bucket t reads: views of the device buffers."""
        mixed = kind == "mixed"
        ids, positions, slot_mapping, logits = self.buf.dev64[:, :t]
        d, B = self.buf.d, self.buf.B if mixed else t
        host_cu_q = list(range(B + 1))  # host bounds only: the kernels read the device buffers
        n_single, n_block = self.buf.item_capacity(t, kind)
        count = d["item_count"] if counts_items(kind, self.buf.B) else None
        work = dict(items=d["items"][:3 * (n_single + n_block)].view(-1, 3), item_rows=self.buf.item_rows,
                    num_single=n_single, items_cover=True, item_count=count) if n_single + n_block else {}
        if mixed:
            attn = AttentionMeta(cu_q=d["cu_q"][:B + 1], kv_lens=d["kv_lens"][:B], block_tables=d["tables"][:B],
                                 max_q_len=t, max_kv_len=self.max_model_len, host_cu_q=host_cu_q,
                                 host_kv_lens=[self.max_model_len] * B,
                                 q_tiles=d["tiles"][:2 * self.buf.tile_capacity(t)].view(-1, 2),
                                 tile_rows=self.buf.tile_rows)
            # seg_indptr/seg_slot are not read in work-list mode; they only need the plan's shapes
            lora = SegmentPlan(seg_indptr=d["cu_q"][:B + 1], seg_slot=d["kv_lens"][:B], token_slot=d["token_slot"][:t],
                               max_seg_len=t, host_indptr=host_cu_q, host_slot=[int(with_lora)] * B, **work)
        else:
            attn = AttentionMeta(cu_q=d["cu_q"][:t + 1], kv_lens=d["kv_lens"][:t], block_tables=d["tables"][:t],
                                 max_q_len=1, max_kv_len=self.max_model_len, host_cu_q=host_cu_q,
                                 host_kv_lens=[self.max_model_len] * t,
                                 seq_order=d["order"][:t] if DECODE_ORDER else None)
            # one segment per token (or a hybrid work list), so any mix of adapters fits the same graph
            lora = SegmentPlan(seg_indptr=d["cu_q"][:t + 1], seg_slot=d["token_slot"][:t],
                               token_slot=d["token_slot"][:t], max_seg_len=1, host_indptr=host_cu_q,
                               host_slot=[int(with_lora)] * t, **work)
        return Batch(input_ids=ids, positions=positions, slot_mapping=slot_mapping, attn=attn, lora=lora,
                     slot_rank=self.slot_rank, logits_indices=logits[:B])

    @torch.inference_mode()
    def capture(self, only: tuple[str, int, bool] | None = None) -> None:
        """Capture every graph, largest first so smaller ones reuse the memory pool; or the graph `only`
        (after a change to the model, such as its LoRA overlap: profiling A/Bs), in a pool of its own."""
        pool = None
        self.buf.clear()
        device = self.buf.dev64.device
        start, reserved = time.perf_counter(), torch.cuda.memory_reserved(device)
        for key in [only] if only else sorted(self.graphs, key=lambda k: (k[0] != "mixed", -k[1])):
            batch = self.graphs[key][2]
            self.model(batch)  # warm up: compiles kernels, allocates lazily created buffers
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(batch)
            pool = graph.pool()
            self.graphs[key] = (graph, out, batch)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start
        self.capture_bytes = torch.cuda.memory_reserved(device) - reserved  # the graphs' pool and lazy buffers

    def key(self, hb: HostBatch) -> tuple[str, int, bool] | None:
        """(kind, bucket, with_lora) of the graph that runs `hb`, or None if no bucket fits it."""
        n, with_lora = len(hb.kv_lens), any(hb.seq_slots)
        if hb.is_decode:
            if n > self.buckets[-1]:
                return None
            b = next(b for b in self.buckets if b >= n)
            if with_lora and self.sparse_fraction and is_sparse(hb.segments[0], self.buf.decode_single_max,
                                                                 self.sparse_fraction):
                return "sparse", b, True
            return "decode", b, with_lora
        tokens = len(hb.ids)
        if n <= self.buf.B and tokens <= self.token_buckets[-1]:
            return "mixed", next(t for t in self.token_buckets if t >= tokens), with_lora
        return None

    def padded_batch(self, hb: HostBatch) -> Batch:
        """The Batch the graph for `hb` reads (after `run(hb)` it holds hb's metadata, padded)."""
        return self.graphs[self.key(hb)][2]

    def can_run(self, hb: HostBatch) -> bool:
        return self.key(hb) is not None

    def run(self, hb: HostBatch, previous: torch.Tensor | None = None,
            key: tuple[str, int, bool] | None = None) -> torch.Tensor:
        """Logits of the step's sequences that want one, in hb order. `previous`: the device tokens of the
        step in flight, which placeholder ids refer to; `key`: self.key(hb), if the caller has it."""
        kind, t, with_lora = key = key or self.key(hb)
        self.buf.write(hb, t, kind)
        if hb.has_pending:
            resolve_pending(self.buf.dev64[0, :t], previous)
        graph, out, batch = self.graphs[key]
        if graph is not None:
            graph.replay()
        else:
            out = self.model(batch)
        return out[:len(hb.logits_indices)]
