"""The projection and its LoRA in one launch (ops/lora_gemm.py) against cuBLAS + SGMV, as a decode step runs
them: each of Llama-2-7B's fused projections (qkv, o, gate_up, down) in 32 layers with their own weights,
captured as one CUDA graph, so every layer streams its weights from memory as in the model.

    python -m benchmarks.bench_lora_gemm --batch-size 32

1. Tile sweep of the plain projection (no LoRA) per shape, against cuBLAS (F.linear).
2. With LoRA (r=16, 64 adapters resident): cuBLAS then SGMV's shrink + expand, against one fused launch with
   the best tiles of step 1, per popularity.
3. A whole layer (all four projections) both ways.

Prints us per layer and writes `lora_gemm.jsonl` under --out-dir.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.bench_lora_chain import PROJECTIONS, replay_us
from benchmarks.bench_sgmv import with_tiling
from punica.lora.plan import build_segment_plan
from punica.ops import lora_gemm, pdl, sgmv
from punica.workload import adapter_indices

SWEEP = [dict(block_n=n, block_k=k, stages=s, warps=w)
         for n, k, s, w in itertools.product((32, 64, 128), (128, 256), (3, 5), (4,))] + [
    dict(block_n=128, block_k=128, stages=4, warps=8), dict(block_n=64, block_k=512, stages=3, warps=4),
    dict(block_n=64, block_k=256, stages=4, warps=4), dict(block_n=32, block_k=512, stages=4, warps=4)]


class Layers:
    """Per layer and projection: W [N, K], lora_a, lora_b; the step's x and counters."""

    def __init__(self, layers: int, slots: int, rank: int, tokens: int):
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.proj = {}
        for name, h_in, widths in PROJECTIONS:
            offsets = [0]
            for w in widths:
                offsets.append(offsets[-1] + w)
            per_layer = []
            for _ in range(layers):
                w = (torch.randn(sum(widths), h_in, device="cuda", generator=gen) / h_in ** 0.5).bfloat16()
                a = (torch.randn(slots, len(widths) * rank, h_in, device="cuda", generator=gen) / 64).bfloat16()
                b = (torch.randn(slots, sum(widths), rank, device="cuda", generator=gen) / 4).bfloat16()
                a[0], b[0] = 0, 0
                per_layer.append((w, a, b, torch.zeros(4, dtype=torch.int32, device="cuda")))
            self.proj[name] = (h_in, tuple(offsets), per_layer)
        self.slot_rank = torch.full((slots,), rank, dtype=torch.int32, device="cuda")
        self.slot_rank[0] = 0
        self.x = {h: torch.randn(tokens, h, device="cuda").bfloat16() for h in (4096, 11008)}

    def run(self, names, how: str, plan=None) -> None:
        for name in names:
            h_in, offsets, per_layer = self.proj[name]
            x = self.x[h_in]
            for w, a, b, counters in per_layer:
                if how == "cublas":
                    F.linear(x, w)
                elif how == "cublas+sgmv":
                    y = F.linear(x, w)
                    sgmv.add_lora_triton(y, x, a, b, self.slot_rank, plan, offsets)
                elif how == "triton":
                    lora_gemm.lora_linear_triton(x, w, None, None, None, None, None, offsets)
                else:  # fused
                    lora_gemm.lora_linear_triton(x, w, None, a, b, self.slot_rank, plan, offsets, counters)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32])
    ap.add_argument("--popularity", nargs="+", default=["distinct", "uniform", "identical"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="stop the tile sweeps after this long (0: the tiles in ops/lora_gemm.py only)")
    ap.add_argument("--save-config", default=None, metavar="JSON", help="write the best tiles per shape here")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    pdl.set_pdl(args.pdl)
    setup = dict(harness.environment(), bench="lora_gemm", layers=args.layers, rank=args.rank, pdl=args.pdl)
    names = [p[0] for p in PROJECTIONS]
    summary = []

    def record(**row):
        harness.write_jsonl("lora_gemm", [row], setup, args.out_dir)
        print(row, flush=True)
        return row

    for batch in args.batch_size:
        layers = Layers(args.layers, 65, args.rank, batch)
        plans = {}
        for pop in args.popularity:
            slots = sorted(i + 1 for i in adapter_indices(pop, batch, 64, seed=0))
            plans[pop] = with_tiling(build_segment_plan(slots, [1] * batch, torch.device("cuda")), "token")
        best = {}
        for name in names:  # 1. tiles of the plain projection
            h_in, offsets, _ = layers.proj[name]
            shape = (offsets[-1], h_in)
            cublas = replay_us(partial(layers.run, [name], "cublas")) / args.layers
            record(batch=batch, proj=name, how="cublas", us_per_layer=round(cublas, 2))
            results, t0 = [], time.time()
            current = {**lora_gemm.CONFIG, **lora_gemm.SHAPES.get(shape, {})}
            for knobs in SWEEP if args.budget_s > 0 else [{k: current[k] for k in SWEEP[0]}]:  # 0: as configured
                if time.time() - t0 > args.budget_s / len(names) and results:
                    break
                lora_gemm.SHAPES[shape] = dict(knobs)
                us = replay_us(partial(layers.run, [name], "triton")) / args.layers
                results.append((us, knobs))
                record(batch=batch, proj=name, how="triton", knobs=knobs, us_per_layer=round(us, 2))
            us, knobs = min(results, key=lambda r: r[0])
            best[name] = knobs
            lora_gemm.SHAPES[shape] = dict(knobs)
            summary.append(dict(batch=batch, proj=name, popularity="none", cublas=round(cublas, 2),
                                fused=round(us, 2), knobs=knobs))
        for pop, plan in plans.items():  # 2. with LoRA
            for name in names:
                base = replay_us(partial(layers.run, [name], "cublas+sgmv", plan)) / args.layers
                fused = replay_us(partial(layers.run, [name], "fused", plan)) / args.layers
                record(batch=batch, proj=name, popularity=pop, how="cublas+sgmv", us_per_layer=round(base, 2))
                record(batch=batch, proj=name, popularity=pop, how="fused", knobs=best[name],
                       us_per_layer=round(fused, 2))
                summary.append(dict(batch=batch, proj=name, popularity=pop, cublas=round(base, 2),
                                    fused=round(fused, 2), knobs=best[name]))
        for pop in ["none", *plans]:  # 3. whole layers
            how = ("cublas", "triton") if pop == "none" else ("cublas+sgmv", "fused")
            us = [replay_us(partial(layers.run, names, h, plans.get(pop))) / args.layers for h in how]
            for h, u in zip(how, us):
                record(batch=batch, proj="layer", popularity=pop, how=h, us_per_layer=round(u, 2))
            summary.append(dict(batch=batch, proj="layer", popularity=pop, cublas=round(us[0], 2),
                                fused=round(us[1], 2)))
        layers = None
        torch.cuda.empty_cache()
    if args.save_config:
        with open(args.save_config, "w") as f:
            json.dump({"shapes": [[*shape, knobs] for shape, knobs in lora_gemm.SHAPES.items()]}, f)
    print("\ncublas: F.linear (+ SGMV shrink and expand with adapters); fused: ops/lora_gemm.py; us per layer")
    harness.print_table(summary, ["batch", "proj", "popularity", "cublas", "fused", "knobs"])


if __name__ == "__main__":
    main()
