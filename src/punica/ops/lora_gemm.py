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
    check_shapes,
    triton,
)

if triton is not None:
    import triton.language as tl


def _jit(**kwargs):
    return triton.jit(**kwargs) if triton is not None else (lambda fn: fn)


# Tiles per shape, picked on an H200 by `python -m benchmarks.bench_lora_gemm` (set_config changes them).
CONFIG = {
    "block_n": 64,
    "block_k": 256,
    "stages": 4,
    "warps": 4,
    "shrink_block_k": 512,
    "epilogue_r": 8,  # rank columns of lora_b gathered at a time in a tile's epilogue
}
SHAPES: dict[tuple[int, int], dict] = {}  # (N, K) -> knobs that override CONFIG for that weight shape
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
def _shrink_program(x_ptr, a_ptr, v_ptr, rank_ptr, token_slot_ptr, ticket, stride_xm, stride_as, stride_ar,
                    stride_vm, K, R, NS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KS: tl.constexpr):
    """v[m, sl*R:(sl+1)*R] = x[m] @ lora_a[slot, sl*R:(sl+1)*R].T for ticket = m * NS + sl (CUDA cores)."""
    m = ticket // NS
    sl = ticket % NS
    slot = tl.load(token_slot_ptr + m)
    if slot != 0:
        rank = tl.minimum(tl.load(rank_ptr + slot), R)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        a_rows = a_ptr + slot.to(tl.int64) * stride_as + (sl * R + offs_r)[:, None] * stride_ar
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k in range(0, K, BLOCK_KS):
            kk = k + tl.arange(0, BLOCK_KS)
            xk = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
            a = tl.load(a_rows + kk[None, :], mask=r_mask[:, None] & (kk < K)[None, :], other=0.0)
            acc += tl.sum(a.to(tl.float32) * xk[None, :], axis=1)
        tl.store(v_ptr + m.to(tl.int64) * stride_vm + sl * R + offs_r, acc, mask=offs_r < R)


@_jit()
def _lora_epilogue(acc, v_ptr, b_ptr, rank_ptr, token_slot_ptr, offs_n, offs_m, M, N, stride_vm, stride_bs,
                   stride_bn, R, O1, O2, BLOCK_R: tl.constexpr, RC: tl.constexpr):
    """acc[n, m] += v[m, sl(n)*R:...] @ lora_b[slot(m), n, :] for the tile's columns n and rows m."""
    m_ok = offs_m < M
    slots = tl.load(token_slot_ptr + offs_m, mask=m_ok, other=0)
    ranks = tl.minimum(tl.load(rank_ptr + slots), R)
    use = m_ok & (slots != 0)
    sl = (offs_n >= O1).to(tl.int32) + (offs_n >= O2).to(tl.int32)  # output slice of each column
    b_cols = b_ptr + slots[None, :, None].to(tl.int64) * stride_bs + offs_n[:, None, None].to(tl.int64) * stride_bn
    v_cols = v_ptr + offs_m[None, :, None].to(tl.int64) * stride_vm + (sl * R)[:, None, None]
    nm_ok = (offs_n < N)[:, None, None] & use[None, :, None]
    for c in tl.static_range(BLOCK_R // RC):
        offs_r = c * RC + tl.arange(0, RC)
        mask = nm_ok & (offs_r[None, None, :] < ranks[None, :, None])
        b = tl.load(b_cols + offs_r[None, None, :], mask=mask, other=0.0)
        v = tl.load(v_cols + offs_r[None, None, :], mask=mask, other=0.0, cache_modifier=".cg")
        acc += tl.sum(b.to(tl.float32) * v, axis=2)
    return acc


@_jit()
def _gemm_tile(x_ptr, w_ptr, bias_ptr, y_ptr, b_ptr, v_ptr, rank_ptr, token_slot_ptr, counters_ptr, tile, n_shrink,
               stride_xm, stride_wn, stride_ym, stride_bs, stride_bn, stride_vm, M, N, K, R, O1, O2,
               HAS_BIAS: tl.constexpr, LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, RC: tl.constexpr, STAGES: tl.constexpr):
    """y[rows, cols] of tile `tile` = x[rows] @ W[cols].T (+ bias) (+ the LoRA, once the shrinks are done)."""
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    offs_n = (tile % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
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
        acc = _lora_epilogue(acc, v_ptr, b_ptr, rank_ptr, token_slot_ptr, offs_n, offs_m, M, N, stride_vm,
                             stride_bs, stride_bn, R, O1, O2, BLOCK_R, RC)
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@_jit(do_not_specialize=["M"])
def _lora_linear_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, a_ptr, b_ptr, v_ptr, rank_ptr, token_slot_ptr, counters_ptr,
                        stride_xm, stride_wn, stride_ym, stride_as, stride_ar, stride_bs, stride_bn, stride_vm,
                        M, N, K, R, O1, O2, HAS_BIAS: tl.constexpr, LORA: tl.constexpr, NS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_KS: tl.constexpr, RC: tl.constexpr, STAGES: tl.constexpr,
                        PDL: tl.constexpr):
    pdl_start(PDL)
    if LORA:
        n_shrink = M * NS
        ticket = tl.atomic_add(counters_ptr, 1)
        if ticket < n_shrink:
            _shrink_program(x_ptr, a_ptr, v_ptr, rank_ptr, token_slot_ptr, ticket, stride_xm, stride_as,
                            stride_ar, stride_vm, K, R, NS, BLOCK_R, BLOCK_KS)
            tl.debug_barrier()
            tl.atomic_add(counters_ptr + 1, 1, sem="release")
        else:
            _gemm_tile(x_ptr, w_ptr, bias_ptr, y_ptr, b_ptr, v_ptr, rank_ptr, token_slot_ptr, counters_ptr,
                       ticket - n_shrink, n_shrink, stride_xm, stride_wn, stride_ym, stride_bs, stride_bn, stride_vm,
                       M, N, K, R, O1, O2, HAS_BIAS, True, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, RC, STAGES)
        # the last program out zeroes the counters for the next launch
        total = n_shrink + tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        if tl.atomic_add(counters_ptr + 2, 1, sem="acq_rel") == total - 1:
            tl.atomic_xchg(counters_ptr, 0)
            tl.atomic_xchg(counters_ptr + 1, 0)
            tl.atomic_xchg(counters_ptr + 2, 0)
    else:
        _gemm_tile(x_ptr, w_ptr, bias_ptr, y_ptr, b_ptr, v_ptr, rank_ptr, token_slot_ptr, counters_ptr,
                   tl.program_id(0), 0, stride_xm, stride_wn, stride_ym, stride_bs, stride_bn, stride_vm,
                   M, N, K, R, O1, O2, HAS_BIAS, False, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, RC, STAGES)


def load_config(path: str) -> None:
    """Per-shape knobs saved by `python -m benchmarks.bench_lora_gemm --save-config PATH`."""
    import json

    with open(path) as f:
        for n, k, knobs in json.load(f)["shapes"]:
            set_config((n, k), **knobs)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=1024)
def _launch_config(M: int, N: int, K: int, R: int, elem: int, knobs: tuple) -> tuple[int, tuple, int]:
    """(tiles, constexprs from BLOCK_M on, num_warps) for elem-byte inputs."""
    cfg = dict(knobs)
    block_m = max(16, _pow2(M))
    block_n, block_k = cfg["block_n"], min(cfg["block_k"], max(16, _pow2(K)))
    block_r = max(_pow2(R), 1)
    rc = min(cfg["epilogue_r"], block_r)
    tiles = -(-M // block_m) * -(-N // block_n)
    stages = max(1, min(cfg["stages"], SMEM_BUDGET // ((block_n + block_m) * block_k * elem)))
    return tiles, (block_m, block_n, block_k, block_r, min(cfg["shrink_block_k"], max(16, _pow2(K))), rc,
                   stages), cfg["warps"]


def _counters(device: torch.device, cache: dict) -> torch.Tensor:
    if device not in cache:
        cache[device] = torch.zeros(4, dtype=torch.int32, device=device)
    return cache[device]


_shared_counters: dict[torch.device, torch.Tensor] = {}


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, slot_rank: torch.Tensor | None,
                       plan: SegmentPlan | None, slice_offsets: tuple[int, ...],
                       counters: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T (+ bias) + the LoRA of each token's slot, in one launch (see the module docstring).

    x: [T, K]; weight: [N, K]; bias: [N] or None; lora_a/lora_b/slot_rank/plan as for sgmv.add_lora, or all
    None for the plain projection. `counters` is an int32 [4] zero tensor owned by the caller; calls that may
    run concurrently (different CUDA streams) need different ones. No host sync; graph-capturable after one
    eager call. Returns a new [T, N] tensor of x's dtype.
    """
    T, K = x.shape
    N = weight.shape[0]
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != K or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} must be [T, K], [N, K] and [N]")
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    lora = lora_a is not None and plan is not None and plan.has_lora
    if lora:
        _check_slices(slice_offsets)
        check_shapes(x, lora_a, lora_b, slice_offsets, y)
        _check_triton(dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b), slot_rank, plan, T)
        ns = len(slice_offsets) - 1
        R = lora_a.shape[1] // ns
        v = torch.empty(T, ns * R, dtype=torch.float32, device=x.device)
        counters = _counters(x.device, _shared_counters) if counters is None else counters
        offs = list(slice_offsets[1:-1]) + [N] * (3 - ns)
        lora_args = (lora_a, lora_b, v, slot_rank, plan.token_slot, counters)
        lora_strides = (lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1), v.stride(0))
    else:
        if x.dtype != weight.dtype or x.device != weight.device or (not x.is_cuda and not _INTERPRETED):
            raise ValueError(f"x ({x.dtype}, {x.device}) and weight ({weight.dtype}, {weight.device}) must share "
                             "dtype and device, on CUDA (or under TRITON_INTERPRET=1)")
        ns, R, offs = 1, 1, [N, N]
        lora_args = (x,) * 6
        lora_strides = (0, 0, 0, 0, 0)
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("x and weight need unit stride in their last dimension")
    knobs = tuple(sorted({**CONFIG, **SHAPES.get((N, K), {})}.items()))
    tiles, consts, warps = _launch_config(T, N, K, R, x.element_size(), knobs)
    grid = (tiles + (T * ns if lora else 0), 1, 1)
    tensors = (x, weight, x if bias is None else bias, y, *lora_args)
    strides = (x.stride(0), weight.stride(0), y.stride(0), *lora_strides)
    _launch(_lora_linear_kernel, grid, tensors, strides, (T,),
            (N, K, R, offs[0], offs[1], bias is not None, lora, ns, *consts), warps)
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
