"""The base projection and its per-token LoRA in one launch: y = x @ W.T (+ b) + LoRA(x), for decode-sized steps.

SGMV adds a projection's LoRA with two more launches (shrink, expand) beside cuBLAS's GEMM. At batch 32 a
decode step has 128 projections, and the LoRA's cost there is those launches' latency more than its bytes
(benchmarks/results/sgmv_NOTES.md). This kernel does the whole projection in one grid of two kinds of program:

    shrink programs   v[t, i*R:(i+1)*R] = x[t] @ lora_a[slot(t), i*R:(i+1)*R].T   one per (token, slice)
    GEMM tiles        y[rows, cols] = x[rows] @ W[cols].T, then + v[rows] @ lora_b[slot(row), cols].T

Every program first takes a ticket from an atomic counter: the first tickets are the shrinks, the rest the
tiles. A tile streams its part of W (the long part), then waits until every shrink has published v. A
program holding a ticket is running, so every shrink a tile waits for has started and nothing can deadlock,
whatever order the GPU schedules blocks in. The last program out resets the counters, so the launch can be
replayed in a CUDA graph. The LoRA's adapter bytes stream alongside W's instead of after it.

Layout of lora_a, lora_b and slot_rank: ops/sgmv.py. Tokens run one slot each (`plan.token_slot`); slot 0
adds nothing. The torch reference is `lora_linear_torch`.
"""

from __future__ import annotations

import functools

import torch

from punica.ops.pdl import pdl_start
from punica.ops.sgmv import (
    _INTERPRETED,
    SegmentPlan,
    _check_slices,
    _check_triton,
    _launch,
    add_lora_torch,
    add_lora_triton,
    check_shapes,
    triton,
)

if triton is not None:
    import triton.language as tl


def _jit(**kwargs):
    return triton.jit(**kwargs) if triton is not None else (lambda fn: fn)


# Tiles, picked on an H200 at 32 tokens by `python -m benchmarks.bench_lora_gemm` (set_config changes them):
# the sweep's best for Llama-2-7B's projections (N, K); CONFIG for other shapes.
CONFIG = {
    "block_n": 64,
    "block_k": 128,
    "stages": 5,
    "warps": 4,
    "shrink_block_k": 512,  # h_in columns per shrink program (its partial sum)
    "epilogue_r": 8,  # rank columns of lora_b gathered at a time in a tile's epilogue
}
SHAPES: dict[tuple[int, int], dict] = {(12288, 4096): dict(stages=3)}  # (N, K) -> knobs over CONFIG
# Where the plain projection (no LoRA in the step) beat cuBLAS in that sweep, us per layer at 32 tokens:
# qkv 26.8 vs 28.7, o 11.6 vs 13.5; gate_up (47.5 vs 46.2) and down (27.5 vs 27.3) stay on cuBLAS.
PLAIN_SHAPES = {(12288, 4096), (4096, 4096)}
PLAIN_MAX_TOKENS = 32  # the token count it was measured at
MAX_TOKENS = 64  # larger steps: cuBLAS + SGMV (the GEMM is no longer a thin stream of W)
SMEM_BUDGET = 160 * 1024  # bytes of pipelined W and x tiles per program (an H200 SM has 227 KiB)


def set_config(shape: tuple[int, int] | None = None, **knobs: int) -> None:
    """Change knobs for every shape, or for weights of `shape` (N, K) only."""
    for name in knobs:
        if name not in CONFIG:
            raise KeyError(f"unknown lora_linear knob {name!r}; known: {sorted(CONFIG)}")
    if shape is None:
        CONFIG.update(knobs)
    else:
        SHAPES.setdefault(tuple(shape), {}).update(knobs)


@_jit()
def _shrink_program(x_ptr, a_ptr, ws_ptr, rank_ptr, token_slot_ptr, ticket, stride_xm, stride_as, stride_ar, M,
                    K, R, NS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KS: tl.constexpr):
    """ws[s, m, sl*R:(sl+1)*R] = x[m, ks] @ lora_a[slot, sl*R:(sl+1)*R, ks].T over the s-th BLOCK_KS columns ks,
    for ticket = (m * NS + sl) * SPLIT + s: one load of A each, on the CUDA cores."""
    s = ticket % SPLIT
    sl = (ticket // SPLIT) % NS
    m = ticket // (SPLIT * NS)
    slot = tl.load(token_slot_ptr + m)
    if slot != 0:
        rank = tl.minimum(tl.load(rank_ptr + slot), R)
        offs_r = tl.arange(0, BLOCK_R)
        kk = s * BLOCK_KS + tl.arange(0, BLOCK_KS)
        xk = tl.load(x_ptr + m.to(tl.int64) * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + slot.to(tl.int64) * stride_as + (sl * R + offs_r)[:, None] * stride_ar + kk[None, :],
                    mask=(offs_r < rank)[:, None] & (kk < K)[None, :], other=0.0)
        part = tl.sum(a.to(tl.float32) * xk[None, :], axis=1)
        tl.store(ws_ptr + (s * M + m).to(tl.int64) * (NS * R) + sl * R + offs_r, part, mask=offs_r < R)


@_jit()
def _lora_epilogue(acc, ws_ptr, b_ptr, rank_ptr, token_slot_ptr, n0, offs_n, offs_m, M, N, stride_bs, stride_bn,
                   R, O1, O2, NS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   RC: tl.constexpr):
    """acc[n, m] += v[m, sl*R:(sl+1)*R] @ lora_b[slot(m), n, :], v the sum of the shrinks' SPLIT partials, for
    the tile's columns n (all in output slice sl) and rows m."""
    m_ok = offs_m < M
    slots = tl.load(token_slot_ptr + offs_m, mask=m_ok, other=0)
    ranks = tl.minimum(tl.load(rank_ptr + slots), R)
    use = m_ok & (slots != 0)
    sl = (n0 >= O1).to(tl.int32) + (n0 >= O2).to(tl.int32)  # the host made every tile lie in one slice
    b_cols = b_ptr + slots[None, :, None].to(tl.int64) * stride_bs + offs_n[:, None, None].to(tl.int64) * stride_bn
    v_rows = ws_ptr + offs_m[:, None].to(tl.int64) * (NS * R) + sl * R
    for c in tl.static_range(BLOCK_R // RC):
        offs_r = c * RC + tl.arange(0, RC)
        mask = use[:, None] & (offs_r[None, :] < ranks[:, None])
        v = tl.zeros((BLOCK_M, RC), dtype=tl.float32)
        for s in tl.static_range(SPLIT):  # a fixed order: results do not depend on scheduling
            v += tl.load(v_rows + s * M * (NS * R) + offs_r[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        b = tl.load(b_cols + offs_r[None, None, :], mask=(offs_n < N)[:, None, None] & mask[None, :, :], other=0.0)
        acc += tl.sum(b.to(tl.float32) * v[None, :, :], axis=2)
    return acc


@_jit()
def _gemm_tile(x_ptr, w_ptr, bias_ptr, y_ptr, b_ptr, ws_ptr, rank_ptr, token_slot_ptr, counters_ptr, tile, n_shrink,
               stride_xm, stride_wn, stride_ym, stride_bs, stride_bn, M, N, K, R, O1, O2, HAS_BIAS: tl.constexpr,
               LORA: tl.constexpr, NS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, RC: tl.constexpr,
               STAGES: tl.constexpr):
    """y[rows, cols] of tile `tile` = x[rows] @ W[cols].T (+ bias) (+ the LoRA, once the shrinks are done)."""
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    n0 = (tile % n_tiles_n) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = (tile // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    m_ok = offs_m < M
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T: W's rows fill the MMA's long side
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k_ok = (k + offs_k) < K
        w = tl.load(w_ptrs + k, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs + k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(xt), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if LORA:
        done = tl.atomic_add(counters_ptr + 1, 0, sem="acquire")
        while done < n_shrink:
            done = tl.atomic_add(counters_ptr + 1, 0, sem="acquire")
        acc = _lora_epilogue(acc, ws_ptr, b_ptr, rank_ptr, token_slot_ptr, n0, offs_n, offs_m, M, N, stride_bs,
                             stride_bn, R, O1, O2, NS, SPLIT, BLOCK_M, BLOCK_R, RC)
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@_jit(do_not_specialize=["M"])
def _lora_linear_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, a_ptr, b_ptr, ws_ptr, rank_ptr, token_slot_ptr, counters_ptr,
                        stride_xm, stride_wn, stride_ym, stride_as, stride_ar, stride_bs, stride_bn,
                        M, N, K, R, O1, O2, HAS_BIAS: tl.constexpr, LORA: tl.constexpr, NS: tl.constexpr,
                        SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_KS: tl.constexpr, RC: tl.constexpr, STAGES: tl.constexpr,
                        PDL: tl.constexpr):
    pdl_start(PDL)
    if LORA:
        n_shrink = M * NS * SPLIT
        ticket = tl.atomic_add(counters_ptr, 1)
        if ticket < n_shrink:
            _shrink_program(x_ptr, a_ptr, ws_ptr, rank_ptr, token_slot_ptr, ticket, stride_xm, stride_as,
                            stride_ar, M, K, R, NS, SPLIT, BLOCK_R, BLOCK_KS)
            tl.debug_barrier()
            tl.atomic_add(counters_ptr + 1, 1, sem="release")
        else:
            _gemm_tile(x_ptr, w_ptr, bias_ptr, y_ptr, b_ptr, ws_ptr, rank_ptr, token_slot_ptr, counters_ptr,
                       ticket - n_shrink, n_shrink, stride_xm, stride_wn, stride_ym, stride_bs, stride_bn, M, N, K,
                       R, O1, O2, HAS_BIAS, True, NS, SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, RC, STAGES)
        # the last program out zeroes the counters for the next launch
        total = n_shrink + tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        if tl.atomic_add(counters_ptr + 2, 1, sem="acq_rel") == total - 1:
            tl.atomic_xchg(counters_ptr, 0)
            tl.atomic_xchg(counters_ptr + 1, 0)
            tl.atomic_xchg(counters_ptr + 2, 0)
    else:
        _gemm_tile(x_ptr, w_ptr, bias_ptr, y_ptr, b_ptr, ws_ptr, rank_ptr, token_slot_ptr, counters_ptr,
                   tl.program_id(0), 0, stride_xm, stride_wn, stride_ym, stride_bs, stride_bn, M, N, K, R, O1, O2,
                   HAS_BIAS, False, NS, SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, RC, STAGES)


def load_config(path: str) -> None:
    """Per-shape knobs saved by `python -m benchmarks.bench_lora_gemm --save-config PATH`."""
    import json

    with open(path) as f:
        for n, k, knobs in json.load(f)["shapes"]:
            set_config((n, k), **knobs)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=1024)
def _launch_config(M: int, N: int, K: int, R: int, elem: int, widths: tuple[int, ...] | None,
                   knobs: tuple) -> tuple[int, int, tuple, int] | None:
    """(grid size, shrink programs, constexprs from SPLIT on, num_warps) for elem-byte inputs; `widths` are the
    output slices with LoRA (None: the plain projection). None when no tile width divides every slice."""
    cfg = dict(knobs)
    block_m = max(16, _pow2(M))
    block_n, block_k = cfg["block_n"], min(cfg["block_k"], max(16, _pow2(K)))
    while widths and block_n > 16 and any(w % block_n for w in widths):
        block_n //= 2  # every tile in one output slice: its epilogue reads one slice of v
    if widths and any(w % block_n for w in widths):
        return None
    block_r = max(_pow2(R), 1)
    block_ks = min(cfg["shrink_block_k"], max(16, _pow2(K)))
    split = -(-K // block_ks)
    shrinks = M * len(widths) * split if widths else 0
    tiles = -(-M // block_m) * -(-N // block_n)
    stages = max(1, min(cfg["stages"], SMEM_BUDGET // ((block_n + block_m) * block_k * elem)))
    consts = (split, block_m, block_n, block_k, block_r, block_ks, min(cfg["epilogue_r"], block_r), stages)
    return shrinks + tiles, shrinks, consts, cfg["warps"]


_shared_counters: dict[torch.device, torch.Tensor] = {}


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, slot_rank: torch.Tensor | None,
                       plan: SegmentPlan | None, slice_offsets: tuple[int, ...],
                       counters: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T (+ bias) + the LoRA of each token's slot, in one launch (see the module docstring).

    x: [T, K]; weight: [N, K]; bias: [N] or None; lora_a/lora_b/slot_rank/plan as for sgmv.add_lora, or all
    None for the plain projection. `counters` is an int32 [4] zero tensor owned by the caller; calls that may
    run concurrently (different CUDA streams) need different ones. No host sync; graph-capturable after one
    eager call. Returns a new [T, N] tensor of x's dtype. Slices that no tile width >= 16 divides run as
    cuBLAS + SGMV instead.
    """
    T, K = x.shape
    N = weight.shape[0]
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != K or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} must be [T, K], [N, K] and [N]")
    if x.dtype != weight.dtype or x.device != weight.device or (not x.is_cuda and not _INTERPRETED):
        raise ValueError(f"x ({x.dtype}, {x.device}) and weight ({weight.dtype}, {weight.device}) must share "
                         "dtype and device, on CUDA (or under TRITON_INTERPRET=1)")
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("x and weight need unit stride in their last dimension")
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    lora = lora_a is not None and plan is not None and plan.has_lora
    widths = None
    if lora:
        _check_slices(slice_offsets)
        check_shapes(x, lora_a, lora_b, slice_offsets, y)
        _check_triton(dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b), slot_rank, plan, T)
        widths = tuple(b - a for a, b in zip(slice_offsets, slice_offsets[1:]))
    R = lora_a.shape[1] // len(widths) if lora else 1
    knobs = tuple(sorted({**CONFIG, **SHAPES.get((N, K), {})}.items()))
    config = _launch_config(T, N, K, R, x.element_size(), widths, knobs)
    if config is None:
        y = torch.nn.functional.linear(x, weight, bias)
        add_lora_triton(y, x, lora_a, lora_b, slot_rank, plan, slice_offsets)
        return y
    programs, shrinks, consts, warps = config
    if lora:
        ws = torch.empty(consts[0], T, len(widths) * R, dtype=torch.float32, device=x.device)  # shrink partials
        counters = _shared_counters.setdefault(x.device, torch.zeros(4, dtype=torch.int32, device=x.device)) \
            if counters is None else counters
        offs = list(slice_offsets[1:-1]) + [N] * (3 - len(widths))
        lora_args = (lora_a, lora_b, ws, slot_rank, plan.token_slot, counters)
        lora_strides = (lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1))
    else:
        offs, lora_args, lora_strides = [N, N], (x,) * 6, (0, 0, 0, 0)
    tensors = (x, weight, x if bias is None else bias, y, *lora_args)
    strides = (x.stride(0), weight.stride(0), y.stride(0), *lora_strides)
    _launch(_lora_linear_kernel, (programs, 1, 1), tensors, strides, (T,),
            (N, K, R, offs[0], offs[1], bias is not None, lora, len(widths or (0,)), *consts), warps)
    return y


def lora_linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, slot_rank: torch.Tensor | None,
                      plan: SegmentPlan | None, slice_offsets: tuple[int, ...],
                      counters: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: the base projection, then the SGMV reference's LoRA (signature of lora_linear_triton)."""
    y = torch.nn.functional.linear(x, weight, bias)
    if lora_a is not None and plan is not None:
        add_lora_torch(y, x, lora_a, lora_b, slot_rank, plan, slice_offsets)
    return y


def linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T (+ bias): the projection without LoRA."""
    return torch.nn.functional.linear(x, weight, bias)


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear_torch, with this module's GEMM for decode-sized steps on the weight shapes where it measured
    faster than cuBLAS (PLAIN_SHAPES); cuBLAS otherwise."""
    if (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= PLAIN_MAX_TOKENS and x.dtype == weight.dtype
            and x.dtype in (torch.float16, torch.bfloat16) and tuple(weight.shape) in PLAIN_SHAPES):
        return lora_linear_triton(x, weight, bias, None, None, None, None, (0, weight.shape[0]))
    return torch.nn.functional.linear(x, weight, bias)
