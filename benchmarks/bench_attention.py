"""Decode attention (ops/attention.py) against the time to read its K/V at copy bandwidth, as a decode step
runs it: `--layers` layers, each with its own paged KV pool (16-token pages, shuffled), captured as one CUDA
graph so every layer streams its cache from memory.

    python -m benchmarks.bench_attention --batch-size 32 --context 400 mixed

Sweeps the decode tiles (BLOCK_N, warps, stages) and the context splits; `max_kv_len` is the graph's
capacity, as in the engine's captured steps (so the default splits are those the engine gets). "mixed"
contexts: seeded uniform lengths in [64, 800]. Prints us per layer and floor ratios, writes
`attention.jsonl` under --out-dir.

    python -m benchmarks.bench_attention --batch-size 32 128 --mixed 128

instead times a mixed step's attention: sequence 0 computes a CHUNK-token prefill chunk after its context,
the others decode; with a mixed graph's work list, the decodes on the prefill kernel or on the decode kernel
(`attention.SPLIT_MIXED`), the two kernels one after the other or on two streams (`attention.OVERLAP_MIXED`).
"""

from __future__ import annotations

import argparse
import random
import time
from functools import partial

import torch

from benchmarks import harness
from punica.ops import attention, pdl
from punica.ops.attention import AttentionMeta

PAGE = 16
# (BLOCK_N, warps, stages) to sweep
TILES = [(64, 4, 3), (64, 4, 2), (64, 4, 4), (32, 4, 3), (32, 2, 4), (128, 4, 2), (128, 8, 2), (64, 8, 3)]


def context_lens(spec: str, batch: int, seed: int = 0) -> list[int]:
    if spec == "mixed":
        rng = random.Random(seed)
        return [rng.randint(64, 800) for _ in range(batch)]
    return [int(spec)] * batch


class Pools:
    """Per layer a K and V pool holding `lens` contexts in shuffled pages; one q; the metadata."""

    def __init__(self, layers: int, lens: list[int], h_q: int, h_kv: int, d: int, capacity: int, device: str,
                 kv_dtype: torch.dtype | None = None):
        gen = torch.Generator().manual_seed(0)
        capacity = max(capacity, *lens)
        pages = [-(-n // PAGE) for n in lens]
        total = sum(pages)
        tables = torch.zeros(len(lens), -(-capacity // PAGE), dtype=torch.int32)
        perm, used = torch.randperm(total, generator=gen), 0
        for b, n in enumerate(pages):
            tables[b, :n] = perm[used:used + n]
            used += n
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.kv = [(torch.randn(total, PAGE, h_kv, d, device=device).to(kv_dtype or dtype),
                    torch.randn(total, PAGE, h_kv, d, device=device).to(kv_dtype or dtype)) for _ in range(layers)]
        self.q = torch.randn(len(lens), h_q, d, device=device).to(dtype)
        cu_q = list(range(len(lens) + 1))
        self.meta = AttentionMeta(cu_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
                                  kv_lens=torch.tensor(lens, dtype=torch.int32, device=device),
                                  block_tables=tables.to(device), max_q_len=1, max_kv_len=capacity,
                                  host_cu_q=cu_q, host_kv_lens=list(lens))
        self.bytes = 2 * sum(lens) * h_kv * d * self.kv[0][0].element_size() * layers

    def order(self, on: bool) -> None:
        """Decode programs longest context first (AttentionMeta.seq_order, as the engine's decode graphs)."""
        lens = self.meta.host_kv_lens
        order = sorted(range(len(lens)), key=lambda b: -lens[b])
        self.meta.seq_order = torch.tensor(order, dtype=torch.int32, device=self.q.device) if on else None

    def run(self, splits: int | None) -> None:
        for k, v in self.kv:
            attention.decode_attention_triton(self.q, k, v, self.meta, 0.088, num_splits=splits)

    def make_mixed(self, chunk: int) -> None:
        """Sequence 0's last `chunk` context tokens become its queries (a prefill chunk), as a mixed graph
        runs them: a work list of query tiles padded to its capacity, max_q_len the chunk."""
        meta, lens = self.meta, self.meta.host_kv_lens
        q_lens = [chunk] + [1] * (len(lens) - 1)
        cu_q = [0]
        for n in q_lens:
            cu_q.append(cu_q[-1] + n)
        device = self.q.device
        self.q = torch.randn(cu_q[-1], *self.q.shape[1:], device=device).to(self.q.dtype)
        rows = attention.prefill_tile_rows(self.q.shape[2], self.q.dtype, chunk)
        capacity = -(-cu_q[-1] // rows) + len(lens)
        meta.cu_q, meta.host_cu_q, meta.max_q_len, meta.tile_rows = (
            torch.tensor(cu_q, dtype=torch.int32, device=device), cu_q, chunk, rows)
        self.capacity, self.rows = capacity, rows

    def run_mixed(self) -> None:
        for k, v in self.kv:
            attention.paged_attention_triton(self.q, k, v, self.meta, 0.088)

    def set_tiles(self) -> None:
        """The work list for the current attention.SPLIT_MIXED, padded to the graph's capacity."""
        flat = attention.query_tiles(self.meta.host_cu_q, self.rows)
        flat += [-1, 0] * (self.capacity - len(flat) // 2)
        self.meta.q_tiles = torch.tensor(flat, dtype=torch.int32, device=self.q.device).view(-1, 2)


def pool_dtype(args) -> torch.dtype | None:
    return torch.float8_e4m3fn if args.kv_dtype == "fp8" else None


def bench_mixed(args, setup: dict, bandwidth: float, device: str) -> None:
    """A mixed step's attention, the decodes on the prefill kernel (split off) or the decode kernel (on)."""
    h_q, h_kv, d = args.heads
    summary = []
    try:
        for batch in args.batch_size:
            for ctx in args.context:
                lens = context_lens(ctx, batch)
                lens[0] += args.mixed
                pools = Pools(args.layers, lens, h_q, h_kv, d, args.capacity, device, pool_dtype(args))
                pools.make_mixed(args.mixed)
                floor = pools.bytes / bandwidth * 1e6 / args.layers
                for split, overlap in ((False, False), (True, False), (True, True)):
                    attention.SPLIT_MIXED, attention.OVERLAP_MIXED = split, overlap
                    pools.set_tiles()
                    us = time_us(pools.run_mixed) / args.layers
                    row = dict(batch=batch, context=ctx, chunk=args.mixed, mean_context=round(sum(lens) / batch, 1),
                               split_mixed=split, overlap_mixed=overlap, us_per_layer=round(us, 2),
                               floor_us=round(floor, 2), floor_ratio=round(us / floor, 3))
                    harness.write_jsonl("attention", [row], setup, args.out_dir)
                    summary.append(row)
                    print(row, flush=True)
                pools = None
                if device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        attention.SPLIT_MIXED = attention.OVERLAP_MIXED = True
    print(f"\nmixed-step attention, us per layer ({args.layers} layers in one CUDA graph), floor = KV bytes at "
          f"{bandwidth / 1e12:.2f} TB/s")
    harness.print_table(summary, ["batch", "context", "chunk", "split_mixed", "overlap_mixed", "us_per_layer",
                                  "floor_us", "floor_ratio"])


def attention_default(group: int, d: int, kv_as_a: bool) -> tuple[int, int, int]:
    """(BLOCK_N, warps, stages) of ops/attention.py's decode_config on this device, bf16 q."""
    device = torch.device("cuda") if torch.cuda.is_available() else None
    c = attention.decode_config(d, group, torch.bfloat16, device, kv_as_a)
    return c["BLOCK_N"], c["num_warps"], c["num_stages"]


def time_us(fn) -> float:
    if torch.cuda.is_available():
        return harness.time_graph(fn, reps=20)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32])
    ap.add_argument("--context", nargs="+", default=["400", "mixed", "1024"])
    ap.add_argument("--heads", type=int, nargs=3, default=[32, 32, 128], metavar=("HQ", "HKV", "D"))
    ap.add_argument("--capacity", type=int, default=4096, help="max_kv_len the graph is captured for")
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 4], help="0: decode_splits' choice")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tiles", type=int, default=len(TILES), help="how many of TILES to sweep")
    ap.add_argument("--tile", nargs="+", default=None, metavar="BLOCK_N,WARPS,STAGES",
                    help="sweep these decode tiles instead of TILES")
    ap.add_argument("--fp8-dot-fp16", nargs="+", choices=["on", "off"], default=["on", "off"],
                    help="with an fp8 pool: the dots in fp16, or in q's dtype (attention.FP8_DOT_FP16)")
    ap.add_argument("--order", nargs="+", choices=["plain", "longest-first"], default=["plain", "longest-first"],
                    help="program order: grid order, or longest context first (AttentionMeta.seq_order)")
    ap.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--mixed", type=int, default=0, metavar="CHUNK",
                    help="time a mixed step instead: a CHUNK-token prefill chunk among decodes, split off and on")
    ap.add_argument("--kv-dtype", choices=["auto", "fp8"], default="auto",
                    help="the pools' dtype: q's (bf16 on CUDA), or float8 e4m3 (kv_cache_dtype fp8)")
    ap.add_argument("--kv-as-a", nargs="+", choices=["never", "always"], default=None,
                    help="the decode kernel's dot orientations to sweep (attention.DECODE_KV_AS_A; default: the "
                         "module's choice for the pools' dtype)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    pdl.set_pdl(args.pdl)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = harness.copy_bandwidth() if device == "cuda" else float("nan")
    h_q, h_kv, d = args.heads
    setup = dict(harness.environment(), bench="attention", layers=args.layers, heads=args.heads, page=PAGE,
                 capacity=args.capacity, pdl=args.pdl, copy_bandwidth_GBps=round(bandwidth / 1e9, 1),
                 kv_dtype=args.kv_dtype)
    kv_dtype = pool_dtype(args)
    if args.mixed:
        bench_mixed(args, setup, bandwidth, device)
        return
    default_dot, default_as_a = attention.FP8_DOT_FP16, attention.DECODE_KV_AS_A
    fp16_dots = [v == "on" for v in args.fp8_dot_fp16] if kv_dtype is not None else [default_dot]
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tile] if args.tile else TILES[:args.tiles]
    probe = torch.empty(0, dtype=kv_dtype or torch.bfloat16)
    as_a_default = "always" if attention._kv_as_a(probe) else "never"
    default_config = attention.decode_config
    default_tiles = attention_default(h_q // h_kv, d, as_a_default == "always")
    as_a_values = args.kv_as_a or [as_a_default]
    summary = []
    try:
        for batch in args.batch_size:
            for ctx in args.context:
                lens = context_lens(ctx, batch)
                pools = Pools(args.layers, lens, h_q, h_kv, d, args.capacity, device, kv_dtype)
                floor = pools.bytes / bandwidth * 1e6 / args.layers
                auto = attention.decode_splits(batch, h_kv, args.capacity, torch.device(device))
                best = None
                for (block_n, warps, stages), fp16_dot, as_a in (
                        (t, f, a) for t in tiles for f in fp16_dots for a in as_a_values):
                    config = dict(BLOCK_G=max(16, h_q // h_kv), BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                    attention.decode_config = lambda *_, c=config: c
                    attention.FP8_DOT_FP16, attention.DECODE_KV_AS_A = fp16_dot, as_a
                    for splits, order in ((s, o) for s in args.splits for o in args.order):
                        pools.order(order == "longest-first")
                        us = time_us(partial(pools.run, splits or None)) / args.layers
                        row = dict(batch=batch, context=ctx, mean_context=round(sum(lens) / batch, 1),
                                   order=order, block_n=block_n, warps=warps, stages=stages, splits=splits or auto,
                                   auto_splits=not splits, fp8_dot_fp16=fp16_dot, kv_as_a=as_a,
                                   us_per_layer=round(us, 2),
                                   floor_us=round(floor, 2), floor_ratio=round(us / floor, 3))
                        harness.write_jsonl("attention", [row], setup, args.out_dir)
                        print(row, flush=True)
                        if best is None or us < best["us_per_layer"]:
                            best = row
                        if ((block_n, warps, stages) == default_tiles and not splits and fp16_dot == default_dot
                                and as_a == as_a_default):
                            summary.append(dict(row, config="default"))
                summary.append(dict(best, config="best"))
                pools = None
                if device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        attention.decode_config, attention.FP8_DOT_FP16 = default_config, default_dot
        attention.DECODE_KV_AS_A = default_as_a
    print(f"\ndecode attention, us per layer ({args.layers} layers in one CUDA graph), floor = KV bytes at "
          f"{bandwidth / 1e12:.2f} TB/s")
    harness.print_table(summary, ["config", "order", "batch", "context", "block_n", "warps", "stages", "splits",
                                  "fp8_dot_fp16", "kv_as_a", "us_per_layer", "floor_us", "floor_ratio"])


if __name__ == "__main__":
    main()
