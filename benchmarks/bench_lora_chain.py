"""The LoRA of a whole decode step, alone: shrink + expand on qkv, o, gate_up and down in each of 32 layers
of Llama-2-7B (r=16), captured as one CUDA graph, as the engine's decode graphs run it. A kernel's cost
inside a chain of hundreds of launches (its latency and tail, back to back) is what a decode step pays;
a single-launch microbenchmark (bench_sgmv) cannot show it. Sweeps tilings and launch knobs.

    python -m benchmarks.bench_lora_chain --batch-size 32 --popularity distinct uniform identical

Prints us per layer for each variant and writes `lora_chain.jsonl` under --out-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import torch

from benchmarks import harness
from benchmarks.bench_sgmv import with_tiling
from punica.engine.cuda_graph import batch_buckets, counts_items, item_capacity, token_buckets
from punica.lora.plan import build_segment_plan
from punica.ops import pdl, sgmv
from punica.workload import adapter_indices

# (name, h_in, output slices) of Llama-2-7B's fused projections
PROJECTIONS = (("qkv", 4096, (4096, 4096, 4096)), ("o", 4096, (4096,)), ("gate_up", 4096, (11008, 11008)),
               ("down", 11008, (4096,)))
EVERY_GRAPH_WALKS = dict(persistent_min_batch=0, sparse_decode=1.0)  # item counts in mixed and (sparse) decode graphs
VARIANTS = {  # named sets of launch-knob variants ({} = the defaults)
    "knobs": [{}, dict(split_by_tokens=0), dict(expand_tiles=4),
              dict(max_split_k=1), dict(max_split_k=2), dict(max_split_k=4), dict(shrink_waves=1),
              dict(shrink_waves=8), dict(shrink_block_k=256), dict(shrink_warps=8), dict(shrink_stages=1),
              dict(max_block_k=1024), dict(expand_block_n=256), dict(expand_waves=1), dict(expand_warps=8),
              dict(expand_stages=1), dict(shrink_block_k=64), dict(expand_warps=2)],
    # prefill-heavy steps: big row blocks, so the expand's tiles (a read and a write of y each) dominate
    "prefill": [{}, dict(expand_tiles=2), dict(expand_tiles=4), dict(expand_block_n=256), dict(expand_block_n=64),
                dict(expand_warps=8), dict(expand_stages=3), dict(list_block_m=64), dict(list_block_m=128),
                dict(list_block_m=64, expand_warps=8), dict(list_block_m=64, expand_tiles=4),
                dict(list_block_m=128, expand_warps=8), dict(shrink_block_k=256), dict(shrink_warps=8)],
    "defaults": [{}],
    "single_max": [{}, dict(mixed_single_max=3), dict(decode_single_max=1)],  # hybrid lists' single items
    # kernels with fewer registers, so more programs per SM. On sm_90 with Triton 3.8's compiler (`python
    # tests/ops/sm90_compile.py --registers`; registers a thread): expand, hybrid, overwrite, BLOCK_N 128 / 64:
    # 95 / 47 (walking: 156 / 80); shrink, hybrid, split K (BLOCK_M, BLOCK_K, single-token BLOCK_K): (32, 128,
    # 512) 168, (32, 64, 256) 128, (16, 128, 256) 96, (32, 32, 256) 94; token mode's shrink, BLOCK_K 512 / 256:
    # 123 / 54. max_block_k=256 halves the single-token BLOCK_K (the A tile of a token: 16 x 256)
    # Session 10 adopted max_block_k=256, list_block_m=16; session 11 set list_block_m back to 32 (end to end at 128)
    "occupancy": [dict(max_block_k=512, list_block_m=32), {}, dict(expand_block_n=64), dict(list_block_m=32),
                  dict(max_block_k=256, shrink_block_k=32), dict(expand_block_n=64, max_block_k=256),
                  dict(expand_block_n=64, max_block_k=256, list_block_m=16),
                  dict(expand_block_n=64, **EVERY_GRAPH_WALKS)],
    # padded lists walked on fixed grids of this many programs per SM (real items only), in every graph
    "persistent": [dict(expand_persistent=0), {}, *(dict(shrink_persistent=n, expand_persistent=n, **EVERY_GRAPH_WALKS)
                                                    for n in (8, 16, 32))],
}

class Chain:
    """Adapter weights for every layer and projection, the step's buffers, and the chain of launches."""

    def __init__(self, layers: int, slots: int, rank: int, tokens: int):
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.weights = []
        for _ in range(layers):
            per_layer = []
            for _, h_in, widths in PROJECTIONS:
                a = torch.randn(slots, len(widths) * rank, h_in, device="cuda", generator=gen).bfloat16()
                b = torch.randn(slots, sum(widths), rank, device="cuda", generator=gen).bfloat16()
                a[0], b[0] = 0, 0
                offsets = [0]
                for w in widths:
                    offsets.append(offsets[-1] + w)
                per_layer.append((a, b, tuple(offsets)))
            self.weights.append(per_layer)
        self.slot_rank = torch.full((slots,), rank, dtype=torch.int32, device="cuda")
        self.slot_rank[0] = 0
        self.x = {h: torch.randn(tokens, h, device="cuda").bfloat16() for h in (4096, 11008)}
        self.y = {sum(w): torch.zeros(tokens, sum(w), device="cuda", dtype=torch.bfloat16) for _, _, w in PROJECTIONS}

    def run(self, plan: sgmv.SegmentPlan) -> None:
        for per_layer in self.weights:
            for (_, h_in, widths), (a, b, offsets) in zip(PROJECTIONS, per_layer):
                sgmv.add_lora_triton(self.y[sum(widths)], self.x[h_in], a, b, self.slot_rank, plan, offsets)


def padded(plan: sgmv.SegmentPlan, tokens: int, batch: int, hybrid: bool) -> sgmv.SegmentPlan:
    """A work-list plan padded with empty items to the capacity of the graph bucket holding `tokens`
    (`cuda_graph.item_capacity`: a mixed graph's when tokens > batch, else a decode graph's), as the
    engine's graphs launch it; other plans as they are. Decode graphs run no plain (non-hybrid) work list:
    such a plan stays as cut. With TUNING["sparse_decode"], a hybrid decode list is a sparse graph's, whose
    item counts the kernels read (`cuda_graph.counts_items`)."""
    mixed = tokens > batch
    if plan.items is None or not (mixed or hybrid):
        return plan
    kind = "mixed" if mixed else "sparse" if sgmv.TUNING["sparse_decode"] else "decode"
    bucket = next(t for t in (token_buckets(1 << 20) if mixed else batch_buckets(batch)) if t >= tokens)
    n_single, n_block = item_capacity(bucket, mixed, hybrid, batch, plan.item_rows, single_max(mixed))
    items = plan.items[:plan.num_single].tolist(), plan.items[plan.num_single:].tolist()
    flat = [*items[0], *[[0, 0, 0]] * (n_single - len(items[0])), *items[1], *[[0, 0, 0]] * (n_block - len(items[1]))]
    device = plan.items.device
    count = torch.tensor([len(items[0]), len(items[1])], dtype=torch.int32, device=device)
    return dataclasses.replace(plan, items=torch.tensor(flat, dtype=torch.int32, device=device), num_single=n_single,
                               item_count=count if counts_items(kind, batch) else None)


def single_max(mixed: bool) -> int:
    """The engine's single-item limit for hybrid lists of this kind of graph (CudaGraphRunner)."""
    return max(1, sgmv.TUNING["mixed_single_max" if mixed else "decode_single_max"])


def replay_us(fn, reps: int = 20) -> float:
    """Mean GPU time of one replay of fn captured as a CUDA graph (after an eager call that compiles)."""
    fn()
    torch.cuda.synchronize()
    graph = harness.capture(fn)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / reps * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32])
    ap.add_argument("--popularity", nargs="+", default=["distinct", "uniform", "identical"])
    ap.add_argument("--tilings", nargs="+", default=["token", "hybrid", "work_list"],
                    help="token: decode graphs without hybrid lists; work_list: mixed graphs without them")
    ap.add_argument("--variants", choices=sorted(VARIANTS), default="knobs")
    ap.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                    help="programmatic dependent launch (ops/pdl.py)")
    ap.add_argument("--chunk", type=int, default=0,
                    help="a mixed step instead: the first sequence brings a prefill chunk of this many tokens")
    ap.add_argument("--prefill", type=int, nargs=2, default=None, metavar=("SEQS", "CHUNK"),
                    help="a prefill step instead: SEQS sequences of CHUNK tokens each (--batch-size: the graphs' "
                         "sequence capacity)")
    ap.add_argument("--padded", action="store_true",
                    help="work lists padded to a mixed-graph bucket's capacity, as the engine's graphs run them")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop sweeping after this long")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    pdl.set_pdl(args.pdl)
    setup = dict(harness.environment(), bench="lora_chain", layers=args.layers, rank=args.rank, pdl=args.pdl)
    defaults, t0 = dict(sgmv.TUNING), time.time()
    rows, best = [], {}
    for batch in args.batch_size:
        num_adapters = min(2 * batch, 128)
        lengths = [args.prefill[1]] * args.prefill[0] if args.prefill else [args.chunk or 1] + [1] * (batch - 1)
        chain = Chain(args.layers, num_adapters + 1, args.rank, sum(lengths))
        bases = {}
        for pop in args.popularity:
            slots = sorted(i + 1 for i in adapter_indices(pop, len(lengths), num_adapters, seed=0))
            bases[pop] = build_segment_plan(slots, lengths, torch.device("cuda"))
        for knobs in VARIANTS[args.variants]:  # outside: each compiles once; a cut-short sweep has whole ones
            if time.time() - t0 > args.budget_s:
                break
            sgmv.set_tuning(**{**defaults, **knobs})
            plans = {}  # cut per knob set: list_block_m sets the work lists' rows
            for pop, base in bases.items():
                for tiling in args.tilings:
                    plan = with_tiling(base, tiling, sgmv.work_list_rows(), single_max(sum(lengths) > batch))
                    plans[pop, tiling] = padded(plan, sum(lengths), batch, tiling == "hybrid") if args.padded else plan
            for (pop, tiling), plan in plans.items():
                us = replay_us(functools.partial(chain.run, plan)) / args.layers
                row = dict(batch=batch, chunk=args.chunk, prefill=args.prefill, padded=args.padded, popularity=pop,
                           tiling=tiling, knobs=knobs, us_per_layer=round(us, 2))
                rows.append(row)
                harness.write_jsonl("lora_chain", [row], setup, args.out_dir)
                case = best.setdefault((batch, pop, tiling), dict(batch=batch, popularity=pop, tiling=tiling,
                                                                  default=row["us_per_layer"], best=1e9))
                if row["us_per_layer"] < case["best"]:
                    case.update(best=row["us_per_layer"], knobs=knobs)
            print(knobs, [r["us_per_layer"] for r in rows[-len(plans):]], flush=True)
        del chain
        torch.cuda.empty_cache()
    sgmv.set_tuning(**defaults)
    harness.print_table(list(best.values()), ["batch", "popularity", "tiling", "default", "best", "knobs"])
    by_knobs: dict[str, list[float]] = {}
    for r in rows:  # the variants that ran on every case, by their total
        by_knobs.setdefault(repr(r["knobs"]), []).append(r["us_per_layer"])
    complete = {k: v for k, v in by_knobs.items() if len(v) == max(map(len, by_knobs.values()))}
    ranked = sorted(complete.items(), key=lambda kv: sum(kv[1]))
    harness.print_table([dict(knobs=k, total_us_per_layer=round(sum(v), 2)) for k, v in ranked[:8]],
                        ["knobs", "total_us_per_layer"])


if __name__ == "__main__":
    main()
