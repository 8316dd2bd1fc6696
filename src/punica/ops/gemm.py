"""A skinny GEMM for decode steps, y = x @ W.T (+ b), where it measured faster than cuBLAS.

At decode the projection streams W once and x is a few rows: each program takes a BLOCK_N-row strip of W
and all tokens, and computes y.T = W @ x.T so that W's rows fill the MMA's long side. On an H200 at batch 32
it beat cuBLAS on Llama-2-7B's qkv, o and down shapes (down with K split in 2) and lost on gate_up
(benchmarks/results/gemm.jsonl), so `linear_triton` uses it for the listed shapes only.

Weights stored in float8 e4m3 with one fp32 scale per output row (EngineConfig.quantization "fp8",
`quantize_rows_fp8`) run through the same kernel at every token count (LARGE_CONFIG's tiles past MAX_TOKENS): it
converts each W tile to fp16 in registers and multiplies the fp32 sums by the row scales once, in its epilogue.

A projection's LoRA fused into this kernel (shrink programs and an epilogue gather of lora_b, one launch) was
built and measured slower than cuBLAS + SGMV by a third per layer; commit 47c5111 has it, sgmv_NOTES.md the
numbers.
"""

from __future__ import annotations

import functools
import json

import torch

from punica.ops.attention import _dot_dtype
from punica.ops.pdl import pdl_start
from punica.ops.sgmv import _INTERPRETED, _jit, triton
from punica.ops.sgmv_launch import _MAX_LOCKS, _cdiv, _launch, _lock_buffer, _pow2

if triton is not None:
    import triton.language as tl


# Tiles picked on an H200 at 32 tokens by `python -m benchmarks.bench_gemm` (set_config changes them):
# CONFIG, with SHAPES' overrides per weight shape (N, K).
CONFIG = {"block_n": 64, "block_k": 128, "stages": 5, "warps": 4, "split_k": 1, "max_block_m": 128, "fp8_dot": 0}
SHAPES: dict[tuple[int, int], dict] = {
    (12288, 4096): dict(stages=3), (4096, 4096): dict(stages=7),
    (22016, 4096): dict(stages=7), (4096, 11008): dict(split_k=2),
}
# Where it beat cuBLAS, us per layer at 32 tokens (H200, graph of 32 layers, bench_gemm's sweep at c324a43):
# qkv 26.7 vs 28.7, o 11.2 vs 13.7, down (split K 2) 25.0 vs 27.2; gate_up (46.9 vs 46.1) stays on cuBLAS.
PLAIN_SHAPES = {(12288, 4096), (4096, 4096), (4096, 11008)}
MAX_TOKENS = 32  # the token count it was measured at
BESIDE_LORA = True  # also the base GEMM of steps with LoRA: distinct 3501 vs 3366 tok/s at batch 32 (H200)
SMEM_BUDGET = 192 * 1024  # bytes of pipelined W and x tiles per program (an H200 SM has 227 KiB)
# fp8 weights (steps of up to MAX_TOKENS tokens): CONFIG with these overrides per weight shape (N, K). Picked on an
# H200 by `bench_gemm --fp8` (32 layers in a graph, us per layer at 32 tokens, bf16 cuBLAS in brackets): qkv 26.2
# (28.4), o 11.4 (13.6), gate_up 38.6 (46.8), down 23.0 (27.2); at 1 token 21.3, 9.7, 40.9, 19.2 (benchmarks/results/
# textgen_NOTES.md, session 22). Half bf16's bytes, but far from copy bandwidth: not yet bound by memory there.
FP8_SHAPES: dict[tuple[int, int], dict] = {(4096, 4096): dict(block_k=256, stages=4, split_k=2),
                                           (4096, 11008): dict(block_k=256, stages=4, split_k=2)}
# fp8 weights past MAX_TOKENS tokens. At 2048 tokens 1.3-2.3x bf16 cuBLAS's time in two runs (qkv 437 and 597 against
# 301 and 298 us a layer); converting W for cuBLAS instead (torch's conversion) made text generation's prefill steps
# 3.2x slower
LARGE_CONFIG = {"block_n": 128, "block_k": 64, "stages": 3, "warps": 8, "split_k": 1, "max_block_m": 256,
                "fp8_dot": 0}
# fp8_dot knob: 0 converts W to x's dtype (fp16 dots for bf16 x, FP16_DOT); 1 ("a8") also rounds x to float8, one
# scale per token and BLOCK_K columns, for Hopper's fp8 dot on both tiles as stored: 1.2x faster than 0 on qkv and
# gate_up at 1-8 tokens, slower at 32, and it adds x's rounding error (2.6% of the output's norm against 0.16%), so
# it is off
FP8_DOTS = ("convert_w", "a8")
FP8_MAX = 448.0  # the largest finite float8 e4m3fn


def set_config(shape: tuple[int, int] | None = None, **knobs: int) -> None:
    """Change knobs for every shape, or for weights of `shape` (N, K) only."""
    for name in knobs:
        if name not in CONFIG:
            raise KeyError(f"unknown GEMM knob {name!r}; known: {sorted(CONFIG)}")
    if shape is None:
        CONFIG.update(knobs)
    else:
        SHAPES.setdefault(tuple(shape), {}).update(knobs)


def load_config(path: str) -> None:
    """Apply what `python -m benchmarks.bench_gemm --save-config PATH` measured: each shape's best tiles, and
    the shapes where they beat cuBLAS as PLAIN_SHAPES."""
    with open(path) as f:
        saved = json.load(f)
    for n, k, knobs in saved["shapes"]:
        set_config((n, k), **knobs)
    PLAIN_SHAPES.clear()
    PLAIN_SHAPES.update(tuple(shape) for shape in saved["plain"])


@_jit(do_not_specialize=["M"])
def _linear_kernel(x_ptr, w_ptr, bias_ptr, scale_ptr, y_ptr, ws_ptr, lock_ptr, stride_xm, stride_wn, stride_ym, M,
                   N, K, k_per_split, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, FP16_DOT: tl.constexpr,
                   A8: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    """Program (tile, split): y.T[tile] over columns [split * k_per_split, ...) of K. With SPLIT_K > 1 each
    writes fp32 partials and the last one of its tile (an atomic counter that it resets) sums them in a fixed
    order, so results are deterministic and no memset or extra launch is needed. HAS_SCALE: W is float8, read
    in x's dtype, and row n of the sums is multiplied by scale[n] (before the bias). FP16_DOT: the dots run in
    fp16 (float8 converts to it in one instruction a pair, to bf16 in several), x's range clamped to fp16's.
    A8: x rounded to float8 per token and K tile, its scales applied to each tile's sums (FP8_DOTS)."""
    pdl_start(PDL)
    tile = tl.program_id(0) // SPLIT_K
    split = tl.program_id(0) % SPLIT_K
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    offs_n = (tile % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (tile // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    m_ok = offs_m < M
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T
    for k in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        k_ok = (k + offs_k) < k_hi
        w = tl.load(w_ptrs + k, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs + k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if A8:  # x in float8 too, one scale per token and BLOCK_K columns
            xf = xt.to(tl.float32)
            sx = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-12) / 448.0
            acc += tl.dot(w, tl.trans((xf / sx[:, None]).to(w.dtype))) * sx[None, :]
        else:
            if FP16_DOT:
                xt = _dot_dtype(xt, True)
            acc = tl.dot(w.to(xt.dtype), tl.trans(xt), acc)
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        part = ws_ptr + (tile * SPLIT_K).to(tl.int64) * (BLOCK_N * BLOCK_M) \
            + tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tl.store(part + split * (BLOCK_N * BLOCK_M), acc)
        tl.debug_barrier()
        if tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(part + s * (BLOCK_N * BLOCK_M), cache_modifier=".cg")
            if HAS_SCALE:
                total *= tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


@functools.lru_cache(maxsize=1024)
def _launch_config(M: int, N: int, K: int, elem: int, knobs: tuple) -> tuple[int, int, tuple, int, int]:
    """(tiles, programs, ints and constexprs from k_per_split on, num_warps, fp8_dot) for elem-byte inputs."""
    cfg = dict(knobs)
    block_m = min(max(16, _pow2(M)), cfg["max_block_m"])
    block_n, block_k = cfg["block_n"], min(cfg["block_k"], max(16, _pow2(K)))
    stages = max(1, min(cfg["stages"], SMEM_BUDGET // ((block_n + block_m) * block_k * elem)))
    tiles = _cdiv(M, block_m) * _cdiv(N, block_n)
    split = max(1, cfg["split_k"]) if tiles <= _MAX_LOCKS else 1
    k_per_split = _cdiv(_cdiv(K, split), block_k) * block_k  # whole BLOCK_K steps; the last split may be short
    split = _cdiv(K, k_per_split)
    return tiles, tiles * split, (k_per_split, split, block_m, block_n, block_k, stages), cfg["warps"], cfg["fp8_dot"]


def _check_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    weight_scale: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or (
            bias is not None and tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} must be [T, K], [N, K] and [N]")
    if weight_scale is None and x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share their dtype")
    if weight_scale is not None and (weight.dtype != torch.float8_e4m3fn or weight_scale.dtype != torch.float32
                                     or tuple(weight_scale.shape) != (weight.shape[0],)):
        raise ValueError(f"a scaled weight is float8_e4m3fn with one float32 scale per row: weight {weight.dtype}, "
                         f"weight_scale {weight_scale.dtype} {tuple(weight_scale.shape)}")


def gemm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T (+ bias) with this module's kernel, whatever the shape. x: [T, K]; weight: [N, K];
    bias: [N] or None; weight_scale: None, or [N] fp32 with a float8 e4m3 weight (its rows times these).
    No host sync; graph-capturable after one eager call. Calls on different CUDA streams at the same time
    must not split K (CONFIG["split_k"]): they would share the split counters."""
    _check_operands(x, weight, bias, weight_scale)
    if x.device != weight.device or (not x.is_cuda and not _INTERPRETED):
        raise ValueError(f"x ({x.device}) and weight ({weight.device}) must be on one CUDA device (or the CPU "
                         "under TRITON_INTERPRET=1)")
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("x and weight need unit stride in their last dimension")
    (T, K), N = x.shape, weight.shape[0]
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    shapes = FP8_SHAPES if weight_scale is not None else SHAPES
    large = weight_scale is not None and T > MAX_TOKENS  # the shapes' tiles were measured at MAX_TOKENS
    knobs = tuple(sorted((LARGE_CONFIG if large else {**CONFIG, **shapes.get((N, K), {})}).items()))
    tiles, programs, tail, warps, fp8_dot = _launch_config(T, N, K, x.element_size(), knobs)
    scaled = weight_scale is not None
    a8 = scaled and fp8_dot == 1
    split, block_m, block_n = tail[1:4]
    ws = torch.empty(tiles * split * block_n * block_m, dtype=torch.float32, device=x.device) if split > 1 else y
    locks = _lock_buffer(x.device, "gemm") if split > 1 else y
    _launch(_linear_kernel, (programs, 1, 1), (x, weight, x if bias is None else bias,
                                              y if weight_scale is None else weight_scale, y, ws, locks),
            (x.stride(0), weight.stride(0), y.stride(0)), (T,),
            (N, K, *tail[:1], bias is not None, scaled, scaled and not a8 and x.dtype == torch.bfloat16, a8,
             *tail[1:]), warps)
    return y


def quantize_rows_fp8(weight: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): weight [N, K] as float8 e4m3 with one fp32 scale per row, the row's largest magnitude over
    FP8_MAX, so that q[n] * scale[n] ~ weight[n] (relative error under 2^-4 per element). Chunks of rows bound
    the fp32 scratch. An all-zero row gets a tiny scale and zeros."""
    q = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for lo in range(0, weight.shape[0], chunk_rows):
        rows = weight[lo:lo + chunk_rows].float()
        s = rows.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
        q[lo:lo + chunk_rows] = (rows / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        scale[lo:lo + chunk_rows] = s
    return q, scale


def dequantize_rows(weight: torch.Tensor, weight_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`: as it is without a scale, else each float8 row times its scale."""
    if weight_scale is None:
        return weight.to(dtype)
    return (weight.to(torch.float32) * weight_scale[:, None]).to(dtype)


def linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 beside_lora: bool = False, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T (+ bias), the base projection; `beside_lora`: the step adds LoRA to it. With
    `weight_scale` ([N] fp32), weight is float8 e4m3 and its row n stands for weight[n] * weight_scale[n]: the
    sums are computed against the float8 values in x's dtype (exact) and scaled after, as the kernel does."""
    if weight_scale is None:
        return torch.nn.functional.linear(x, weight, bias)
    _check_operands(x, weight, bias, weight_scale)
    y = torch.nn.functional.linear(x, weight.to(x.dtype)).mul_(weight_scale)
    return y if bias is None else y.add_(bias)


def linear_add_torch(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """y += x @ weight.T in place: the GEMM reads y as its C (cuBLAS's beta = 1), in its epilogue, so a delta
    written into y first costs no second pass over y."""
    y.addmm_(x, weight.t())


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  beside_lora: bool = False, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """linear_torch, with gemm_triton for steps of up to MAX_TOKENS tokens on the weight shapes where it
    measured faster than cuBLAS (PLAIN_SHAPES); cuBLAS otherwise, and in steps with LoRA unless BESIDE_LORA
    (there it shares the GPU with the LoRA's side stream; its 64-row strips leave SMs to it). Float8 weights
    (`weight_scale` given) run on gemm_triton at every token count: cuBLAS has no float8-by-16-bit GEMM."""
    if weight_scale is not None:
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            return gemm_triton(x, weight, bias, weight_scale)
        return linear_torch(x, weight, bias, weight_scale=weight_scale)
    if (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= MAX_TOKENS and x.dtype == weight.dtype
            and (BESIDE_LORA or not beside_lora)
            and x.dtype in (torch.float16, torch.bfloat16) and tuple(weight.shape) in PLAIN_SHAPES):
        return gemm_triton(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)
