"""The decode GEMM (ops/gemm.py) against cuBLAS, as a decode step runs them: each of Llama-2-7B's fused
projections (qkv, o, gate_up, down) in 32 layers with their own weights, captured as one CUDA graph, so every
layer streams its weights from memory as in the model.

    python -m benchmarks.bench_gemm --batch-size 32

Sweeps tiles per shape (--budget-s 0: the tiles in ops/gemm.py only), then times a whole layer's four
projections as the engine runs them (linear_triton: this GEMM on PLAIN_SHAPES, cuBLAS elsewhere) against
cuBLAS alone, with PLAIN_SHAPES set to the shapes where the best tiles beat cuBLAS. Prints us per layer and
writes `gemm.jsonl` under --out-dir; --save-config writes the best tiles and those shapes (gemm.load_config
and bench_textgen_lora's --gemm-config apply them).
Session 5's runs (benchmarks/results/lora_gemm.jsonl) came from this script's earlier form, which also timed
the projection with its LoRA fused in (commit 47c5111).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.bench_lora_chain import PROJECTIONS, replay_us
from punica.ops import gemm, pdl


def _variants() -> list[dict]:
    """Tiles to sweep, the most promising first (a sweep cut short by --budget-s keeps those). Session 5's
    grid (lora_gemm.jsonl) found deeper pipelines better on every shape, and N=4096 shapes with 64-row tiles
    fill only 64 of 132 SMs: so more stages, and split K."""
    out = [dict(block_n=64, block_k=128, stages=st, split_k=sk) for st, sk in
           ((5, 1), (7, 1), (5, 2), (7, 2), (5, 4), (3, 2), (3, 4))]
    out += [dict(block_n=32, block_k=128, stages=st, split_k=sk) for st, sk in ((8, 1), (8, 2), (5, 2))]
    out += [dict(block_n=128, block_k=128, stages=st, split_k=sk) for st, sk in ((4, 2), (4, 4), (5, 1))]
    out += [dict(block_n=64, block_k=256, stages=3, split_k=2), dict(block_n=32, block_k=256, stages=5, split_k=1),
            dict(block_n=64, block_k=128, stages=3, split_k=1)]
    return [dict(warps=4, **v) for v in out]


SWEEP = _variants()
HOW = {"cublas": F.linear, "triton": gemm.gemm_triton, "engine": gemm.linear_triton}


class Layers:
    """Per layer and projection a weight W [N, K]; the step's x."""

    def __init__(self, layers: int, tokens: int):
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.weights = {name: [(torch.randn(sum(widths), h_in, device="cuda", generator=gen) / h_in ** 0.5).bfloat16()
                               for _ in range(layers)] for name, h_in, widths in PROJECTIONS}
        self.x = {h: torch.randn(tokens, h, device="cuda").bfloat16() for h in (4096, 11008)}

    def run(self, names, how: str) -> None:
        for name in names:
            for w in self.weights[name]:
                HOW[how](self.x[w.shape[1]], w)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="stop the tile sweeps after this long (0: the tiles in ops/gemm.py only)")
    ap.add_argument("--save-config", default=None, metavar="JSON", help="write the best tiles per shape here")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    pdl.set_pdl(args.pdl)
    setup = dict(harness.environment(), bench="gemm", layers=args.layers, pdl=args.pdl)
    names = [p[0] for p in PROJECTIONS]
    summary, plain = [], set()

    def record(**row):
        harness.write_jsonl("gemm", [row], setup, args.out_dir)
        print(row, flush=True)

    for batch in args.batch_size:
        layers = Layers(args.layers, batch)
        for name in names:
            w = layers.weights[name][0]
            shape = tuple(w.shape)
            cublas = replay_us(partial(layers.run, [name], "cublas")) / args.layers
            record(batch=batch, proj=name, how="cublas", us_per_layer=round(cublas, 2))
            results, t0 = [], time.time()
            current = {**gemm.CONFIG, **gemm.SHAPES.get(shape, {})}
            for knobs in SWEEP if args.budget_s > 0 else [current]:
                if time.time() - t0 > args.budget_s / len(names) and results:
                    break
                gemm.SHAPES[shape] = dict(knobs)
                us = replay_us(partial(layers.run, [name], "triton")) / args.layers
                results.append((us, knobs))
                record(batch=batch, proj=name, how="triton", knobs=knobs, us_per_layer=round(us, 2))
            us, knobs = min(results, key=lambda r: r[0])
            gemm.SHAPES[shape] = dict(knobs)
            if us < cublas:
                plain.add(shape)
            summary.append(dict(batch=batch, proj=name, cublas=round(cublas, 2), triton=round(us, 2), knobs=knobs))
        gemm.PLAIN_SHAPES.clear()
        gemm.PLAIN_SHAPES.update(plain)
        us = {how: replay_us(partial(layers.run, names, how)) / args.layers for how in ("cublas", "engine")}
        for how, u in us.items():
            record(batch=batch, proj="layer", how=how, us_per_layer=round(u, 2))
        summary.append(dict(batch=batch, proj="layer", cublas=round(us["cublas"], 2), triton=round(us["engine"], 2),
                            knobs="linear_triton: PLAIN_SHAPES on this GEMM"))
        layers = None
        torch.cuda.empty_cache()
    if args.save_config:
        with open(args.save_config, "w") as f:
            json.dump({"shapes": [[*shape, knobs] for shape, knobs in gemm.SHAPES.items()],
                       "plain": sorted(plain)}, f)
    print("\nus per layer (32 layers in one CUDA graph)")
    harness.print_table(summary, ["batch", "proj", "cublas", "triton", "knobs"])


if __name__ == "__main__":
    main()
