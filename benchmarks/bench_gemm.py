"""The decode GEMM (ops/gemm.py) against cuBLAS, as a decode step runs them: each of Llama-2-7B's fused
projections (qkv, o, gate_up, down) in 32 layers with their own weights, captured as one CUDA graph, so every
layer streams its weights from memory as in the model.

    python -m benchmarks.bench_gemm --batch-size 32

Sweeps tiles per shape (--budget-s 0: the tiles in ops/gemm.py only), then times a whole layer's four
projections as the engine runs them (linear_triton: this GEMM on PLAIN_SHAPES, cuBLAS elsewhere) against
cuBLAS alone, with PLAIN_SHAPES set to the shapes where the best tiles beat cuBLAS. Prints us per layer and
writes `gemm.jsonl` under --out-dir; --save-config writes the best tiles and those shapes (gemm.load_config
and bench_textgen_lora's --gemm-config apply them).
With --fp8: the projections' weights also as float8 with row scales (quantization "fp8"), timed through
linear_triton at each --batch-size, against cuBLAS on the bf16 weights; with a budget, the fp8 tiles of steps of
up to gemm.MAX_TOKENS tokens are swept too (FP8_SWEEP; larger ones run gemm.LARGE_CONFIG).

    python -m benchmarks.bench_gemm --fp8 --batch-size 1 8 32 256 2048 --budget-s 200

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
# float8 weights: half the bytes of bf16 per tile, so deeper K tiles; past MAX_TOKENS, compute-bound tiles
FP8_SWEEP = [dict(block_n=bn, block_k=bk, stages=st, split_k=sk, warps=4, max_block_m=128, fp8_dot=d)
             for d, bn, bk, st, sk in ((0, 64, 128, 6, 2), (0, 64, 128, 5, 4), (0, 64, 256, 4, 1), (0, 64, 256, 4, 2),
                                       (0, 32, 256, 5, 1), (0, 64, 128, 8, 2), (0, 128, 128, 5, 2),
                                       (0, 128, 256, 3, 2), (0, 32, 128, 8, 2), (0, 64, 128, 5, 1),
                                       (1, 64, 128, 6, 2), (1, 64, 128, 6, 4))]


class Layers:
    """Per layer and projection a weight W [N, K]; the step's x."""

    def __init__(self, layers: int, tokens: int, fp8: bool = False):
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.weights = {name: [(torch.randn(sum(widths), h_in, device="cuda", generator=gen) / h_in ** 0.5).bfloat16()
                               for _ in range(layers)] for name, h_in, widths in PROJECTIONS}
        self.x = {h: torch.randn(tokens, h, device="cuda").bfloat16() for h in (4096, 11008)}
        self.fp8 = {name: [gemm.quantize_rows_fp8(w) for w in ws] for name, ws in self.weights.items()} if fp8 else {}

    def run(self, names, how: str) -> None:
        for name in names:
            if how == "fp8":
                for q, scale in self.fp8[name]:
                    gemm.linear_triton(self.x[q.shape[1]], q, weight_scale=scale)
                continue
            for w in self.weights[name]:
                HOW[how](self.x[w.shape[1]], w)


def fp8_table(args, record) -> list[dict]:
    """Per batch size and projection: cuBLAS on bf16 weights, linear_triton on float8 ones (up to MAX_TOKENS
    tokens the tiles swept within --budget-s, the best kept in gemm.FP8_SHAPES for the rest of the run)."""
    summary = []
    for batch in args.batch_size:
        layers = Layers(args.layers, batch, fp8=True)
        sweep = args.budget_s > 0 and batch <= gemm.MAX_TOKENS  # larger steps: LARGE_CONFIG, not swept here
        for name, *_ in PROJECTIONS:
            shape = tuple(layers.weights[name][0].shape)
            cublas = replay_us(partial(layers.run, [name], "cublas")) / args.layers
            record(batch=batch, proj=name, how="cublas", us_per_layer=round(cublas, 2))
            current = {**gemm.CONFIG, **gemm.FP8_SHAPES.get(shape, {})}
            current = dict(gemm.LARGE_CONFIG) if batch > gemm.MAX_TOKENS else current
            results, t0 = [], time.time()
            for knobs in FP8_SWEEP if sweep else [current]:
                if time.time() - t0 > args.budget_s / len(PROJECTIONS) and results:
                    break
                if sweep:
                    gemm.FP8_SHAPES[shape] = dict(knobs)
                us = replay_us(partial(layers.run, [name], "fp8")) / args.layers
                results.append((us, knobs))
                record(batch=batch, proj=name, how="fp8", knobs=knobs, us_per_layer=round(us, 2))
            us, knobs = min(results, key=lambda r: r[0])
            if sweep:
                gemm.FP8_SHAPES[shape] = dict(knobs)
            summary.append(dict(batch=batch, proj=name, cublas_bf16=round(cublas, 2), fp8=round(us, 2),
                                speedup=round(cublas / us, 2), knobs=knobs))
        layers = None
        torch.cuda.empty_cache()
    print("\nus per layer (32 layers in one CUDA graph): cuBLAS on bf16 weights, ours on float8 weights")
    harness.print_table(summary, ["batch", "proj", "cublas_bf16", "fp8", "speedup", "knobs"])
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="stop the tile sweeps after this long (0: the tiles in ops/gemm.py only)")
    ap.add_argument("--save-config", default=None, metavar="JSON", help="write the best tiles per shape here")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--fp8", action="store_true", help="float8 weights (quantization 'fp8') against bf16 cuBLAS")
    args = ap.parse_args(argv)
    pdl.set_pdl(args.pdl)
    setup = dict(harness.environment(), bench="gemm", layers=args.layers, pdl=args.pdl, fp8_weights=args.fp8)
    names = [p[0] for p in PROJECTIONS]
    summary, plain = [], set()

    def record(**row):
        harness.write_jsonl("gemm", [row], setup, args.out_dir)
        print(row, flush=True)

    if args.fp8:
        fp8_table(args, record)
        return

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
