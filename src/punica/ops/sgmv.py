"""SGMV: the LoRA add-on for a batch whose tokens are grouped into contiguous per-adapter segments.

Weight layout (the only one in the package; `lora/pool.py` writes it, kernels read it):

    lora_a[slot, i*R:(i+1)*R, :]          = A of output slice i, as PEFT stores `lora_A.weight` ([r, h_in]),
                                            zero-padded from the adapter's rank r to R = max_lora_rank
    lora_b[slot, off[i]:off[i+1], :]      = B of output slice i times its scale (alpha/r or alpha/sqrt(r)),
                                            as PEFT stores `lora_B.weight` ([h_out_i, r]), zero-padded to R
    slot_rank[slot]                        = r (the largest of the adapter's ranks), 0 for empty slots

Slot 0 means "no adapter": kernels skip its segments and its weights stay zero. A projection with
several output slices (fused qkv: 3, gate_up: 2) applies one adapter per slice in the same launch.
The scale is folded into B when the adapter is loaded, so the kernels never see it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from punica.ops.pdl import pdl_start
from punica.ops.sgmv_launch import (  # noqa: F401  (re-exported: the tiling modes and knobs of this op)
    HYBRID,
    SEGMENT,
    TOKEN,
    TUNING,
    WORKLIST,
    _expand_config,
    _launch,
    _lock_buffer,
    _num_sms,
    _row_tiling,
    _shrink_config,
    hybrid_graphs,
    set_tuning,
    work_list_rows,
)


@dataclass
class SegmentPlan:
    """Which adapter slot each contiguous run of tokens uses. Built once per step on the host.

    seg_indptr: [S+1] int32, tokens of segment s are seg_indptr[s]:seg_indptr[s+1]
    seg_slot:   [S] int32 adapter slot of each segment (0 = none)
    token_slot: [T] int32 slot of each token (the same information, per token)
    max_seg_len: host int, an upper bound on any segment's length (sizes the grid without a sync)
    host_indptr / host_slot: the same as Python lists, for the torch reference
    items:      optional [N, 3] int32 work list (start, end, slot) of row blocks of at most `item_rows`
                tokens, padded with slot-0 rows: when given, the Triton kernels run one row program per
                item, so the grid depends on N alone (CUDA graphs of steps with any segment structure)
    num_single: with items, the first num_single of them are single tokens (padded with slot-0 rows),
                computed on the CUDA cores (the BGMV path); the rest use tensor cores on item_rows-row tiles
    items_cover: the items also hold the tokens without an adapter (slot-0 items), so they cover every
                token of the step; rows past them (a CUDA graph bucket's padding) carry results nobody
                uses. An overwriting expand (add_lora overwrite) then writes zeros there instead of
                zero-filling y first.
    item_count: with items, optional [2] int32 device tensor: how many of the single-token items and of the
                row-block items are real (the rest is padding). With TUNING["expand_persistent"], the expand
                then walks the real items alone on a fixed grid instead of one program per item and tile.
    """

    seg_indptr: torch.Tensor
    seg_slot: torch.Tensor
    token_slot: torch.Tensor
    max_seg_len: int
    host_indptr: list[int]
    host_slot: list[int]
    items: torch.Tensor | None = None
    item_rows: int = 0
    num_single: int = 0
    items_cover: bool = False
    item_count: torch.Tensor | None = None

    @property
    def num_segments(self) -> int:
        return len(self.host_slot)

    @functools.cached_property
    def has_lora(self) -> bool:  # read by every LoRA layer of a step: computed once
        return any(self.host_slot)


def check_shapes(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 slice_offsets: tuple[int, ...], y: torch.Tensor) -> None:
    """Raise ValueError when the tensors do not follow the layout above."""
    n_slices = len(slice_offsets) - 1
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must be [T, h_in] and [T, h_out]")
    if lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1] or lora_a.shape[1] % n_slices:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} must be [slots, {n_slices}*R, {x.shape[1]}]")
    rank = lora_a.shape[1] // n_slices
    if tuple(lora_b.shape) != (lora_a.shape[0], slice_offsets[-1], rank) or y.shape[1] != slice_offsets[-1]:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} must be [{lora_a.shape[0]}, {slice_offsets[-1]}, "
                         f"{rank}] and y [T, {slice_offsets[-1]}]")
    if x.dtype != lora_a.dtype or y.dtype != lora_b.dtype:
        raise ValueError(f"dtype mismatch: x {x.dtype}, lora_a {lora_a.dtype}, y {y.dtype}, "
                         f"lora_b {lora_b.dtype}")


def sgmv_shrink_torch(x: torch.Tensor, lora_a: torch.Tensor, slot_rank: torch.Tensor,
                      plan: SegmentPlan, v: torch.Tensor, num_slices: int | None = None) -> None:
    """v[t, :] = x[t] @ lora_a[slot(t)].T for every token of a segment with slot != 0 (others untouched).

    x: [T, h_in]; lora_a: [slots, n*R, h_in]; slot_rank: [slots] int32; v: [T, n*R], written in place.
    `num_slices` (n) lets a kernel skip the zero padding past each slot's rank; the reference reads it all.
    """
    p = plan.host_indptr
    for s, slot in enumerate(plan.host_slot):
        if slot and p[s + 1] > p[s]:
            v[p[s]:p[s + 1]] = (x[p[s]:p[s + 1]].float() @ lora_a[slot].float().T).to(v.dtype)


def sgmv_expand_torch(v: torch.Tensor, lora_b: torch.Tensor, slot_rank: torch.Tensor,
                      plan: SegmentPlan, y: torch.Tensor, slice_offsets: tuple[int, ...],
                      scale: torch.Tensor | None = None) -> None:
    """y[t, off[i]:off[i+1]] += v[t, i*R:(i+1)*R] @ lora_b[slot(t), off[i]:off[i+1], :].T  (slot != 0); with
    `scale` [slots, off[-1]] (DoRA), then y[t] *= scale[slot(t)] (slot != 0, the sum rounded to y's dtype first).

    v: [T, n*R]; lora_b: [slots, off[-1], R]; y: [T, off[-1]], updated in place.
    """
    rank = lora_b.shape[2]
    p = plan.host_indptr
    for s, slot in enumerate(plan.host_slot):
        if not slot or p[s + 1] == p[s]:
            continue
        rows = slice(p[s], p[s + 1])
        for i in range(len(slice_offsets) - 1):
            cols = slice(slice_offsets[i], slice_offsets[i + 1])
            delta = v[rows, i * rank:(i + 1) * rank].float() @ lora_b[slot, cols].float().T
            y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)
        if scale is not None:
            y[rows] = (y[rows].float() * scale[slot].float()).to(y.dtype)


def add_lora_torch(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   slot_rank: torch.Tensor, plan: SegmentPlan, slice_offsets: tuple[int, ...],
                   overwrite: bool = False, scale: torch.Tensor | None = None) -> None:
    """y += per-token LoRA delta: shrink then expand (see the module docstring for the layout); with
    `overwrite`, y = that delta (zero for tokens without an adapter), whatever y held; with `scale` [slots, N]
    (DoRA), the rows of tokens with an adapter then times scale[slot]."""
    check_scale(scale, overwrite, lora_b, y)
    if overwrite:
        y.zero_()
    if not plan.has_lora:
        return
    check_shapes(x, lora_a, lora_b, slice_offsets, y)
    v = x.new_zeros(x.shape[0], lora_a.shape[1])
    sgmv_shrink_torch(x, lora_a, slot_rank, plan, v)
    sgmv_expand_torch(v, lora_b, slot_rank, plan, y, slice_offsets, scale)


def check_scale(scale: torch.Tensor | None, overwrite: bool, lora_b: torch.Tensor, y: torch.Tensor) -> None:
    """Raise ValueError unless `scale` is None or a DoRA scale the expand can take: [slots, N] of y's dtype with
    a unit last stride, not with overwrite (a delta of its own has no output to scale)."""
    if scale is None:
        return
    if overwrite:
        raise ValueError("scale (DoRA) scales the projection's output: it cannot go with overwrite")
    if tuple(scale.shape) != tuple(lora_b.shape[:2]) or scale.dtype != y.dtype or scale.stride(-1) != 1:
        raise ValueError(f"scale must be [{lora_b.shape[0]}, {lora_b.shape[1]}] of {y.dtype} with a unit last stride, "
                         f"got {tuple(scale.shape)} {scale.dtype} strides {scale.stride()}")


# ---- Triton kernels -------------------------------------------------------------------------------
#
# Both kernels tile tokens one of two ways, chosen on the host from plan ints (never from device data):
#   segment mode: program m covers rows [indptr[s] + b*BLOCK_M, ...) of segment s = m // seg_blocks, and
#                 multiplies with tl.dot (BLOCK_M >= 16); weights are read once per row block.
#   token mode (BGMV): program m covers token m alone, slot = token_slot[m], and multiplies on the CUDA
#                 cores; used when segments are all short (decode), where it saves the padded rows.
#   work-list mode: program m covers plan.items[m] (rows start:end, at most item_rows of them, one slot),
#                 cut on the host; the grid is the list's length, fixed for a CUDA graph.
# Rank chunks at or past slot_rank[slot] read no weights, so work follows each adapter's own rank.
# The shrink splits h_in over SPLIT_K programs when there are few row blocks; each writes fp32 partials
# and the last one of its tile (an atomic counter that it resets) sums them in a fixed order, so results
# are deterministic and no memset or extra launch is needed (graph-safe).

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend runs without Triton
    triton = tl = None


def _jit(**kwargs):
    return triton.jit(**kwargs) if triton is not None else (lambda fn: fn)


@_jit()
def _row_block(pid_m, indptr_ptr, seg_slot_ptr, token_slot_ptr, seg_blocks, MODE: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """(start, end, slot) of the rows that row program pid_m covers. In WORKLIST and HYBRID modes
    `indptr_ptr` is the plan's items [N, 3]."""
    if MODE == 1:  # TOKEN
        start = pid_m
        end = pid_m + 1
        slot = tl.load(token_slot_ptr + pid_m)
    elif MODE >= 2:  # WORKLIST, HYBRID
        start = tl.load(indptr_ptr + 3 * pid_m)
        end = tl.load(indptr_ptr + 3 * pid_m + 1)
        slot = tl.load(indptr_ptr + 3 * pid_m + 2)
    else:
        seg = pid_m // seg_blocks
        start = tl.load(indptr_ptr + seg) + (pid_m % seg_blocks) * BLOCK_M
        end = tl.load(indptr_ptr + seg + 1)
        slot = tl.load(seg_slot_ptr + seg)
    return start, end, slot


@_jit()
def _row_program(indptr_ptr, seg_slot_ptr, token_slot_ptr, rank_ptr, seg_blocks, R, MODE: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """(pid_m, start, end, slot, rank) of this row program; the caller returns at once when slot == 0 or
    start >= end."""
    pid_m = tl.program_id(0)
    start, end, slot = _row_block(pid_m, indptr_ptr, seg_slot_ptr, token_slot_ptr, seg_blocks, MODE, BLOCK_M)
    return pid_m, start, end, slot, tl.minimum(tl.load(rank_ptr + slot), R)


@_jit()
def _real_item(u, n_units, per_item, n_s, n_single, indptr_ptr):
    """(single, item index, start, end, slot) of unit u of a persistent walk over a work list with n_s real
    single items (SegmentPlan.item_count). Units run item-major over the real single items, then over the
    real row-block items, which follow the singles' padded capacity n_single. Past the last unit
    (u >= n_units) nothing is read and the slot is 0."""
    j = u // per_item
    m = tl.where(j < n_s, j, n_single + j - n_s)
    ok = u < n_units
    item = indptr_ptr + 3 * m
    return (j < n_s, m, tl.load(item, mask=ok, other=0), tl.load(item + 1, mask=ok, other=0),
            tl.load(item + 2, mask=ok, other=0))


@_jit()
def _shrink_rows(x_ptr, a_ptr, v_ptr, ws_ptr, lock_ptr, pid_m, pid_k, pid_r, n_r, start, end, slot, rank,
                 stride_xt, stride_as, stride_ar, stride_vt, T, H_IN, R, NR, k_per_split,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 R_BLOCKS: tl.constexpr, STAGES: tl.constexpr, SUM_AFTER: tl.constexpr, IEEE: tl.constexpr):
    """v[start:end, cols] = x[start:end] @ lora_a[slot, cols].T over split pid_k of h_in (see the kernel).
    One token (BLOCK_M == 1) multiplies on the CUDA cores; SUM_AFTER: its products are summed over k once,
    after the loop, not at every step (TUNING["shrink_sum_after"])."""
    r0 = (pid_r % R_BLOCKS) * BLOCK_R
    cols = (pid_r // R_BLOCKS) * R + r0 + tl.arange(0, BLOCK_R)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < end
    r_mask = r0 + tl.arange(0, BLOCK_R) < rank
    k_lo = pid_k * k_per_split
    k_hi = tl.where(r0 < rank, tl.minimum(k_lo + k_per_split, H_IN), k_lo)  # past the rank: read nothing
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xt
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + cols[:, None] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    products = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # BLOCK_M == 1: summed over k after the loop
    for k in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        kk = k + offs_k
        k_mask = kk < k_hi
        xt = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_rows + kk[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        if BLOCK_M >= 16:
            if IEEE:
                acc = tl.dot(xt, tl.trans(at), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(at), acc)
        elif SUM_AFTER:  # BLOCK_M == 1: [BLOCK_R, BLOCK_K] * [1, BLOCK_K], no reduction across threads here
            products += at.to(tl.float32) * xt.to(tl.float32)
        else:
            acc += tl.sum(at.to(tl.float32) * xt.to(tl.float32), axis=1)[None, :]
    if BLOCK_M == 1 and SUM_AFTER:
        acc = tl.sum(products, axis=1)[None, :]
    out_mask = m_mask[:, None] & (r0 + tl.arange(0, BLOCK_R) < R)[None, :]
    v_ptrs = v_ptr + offs_m[:, None] * stride_vt + cols[None, :]
    if SPLIT_K == 1:
        tl.store(v_ptrs, acc.to(v_ptr.dtype.element_ty), mask=out_mask)
    else:
        ws_tile = ws_ptr + offs_m[:, None] * NR + cols[None, :]
        tl.store(ws_tile + pid_k * T * NR, acc, mask=out_mask)
        tl.debug_barrier()
        lock = lock_ptr + pid_m * n_r + pid_r  # one counter per (row program or item, rank block)
        if tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_tile + s * T * NR, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(v_ptrs, total.to(v_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock, 0)


@_jit()
def _shrink_item(x_ptr, a_ptr, v_ptr, ws_ptr, lock_ptr, m, pid_k, pid_r, n_r, single, start, end, slot, rank,
                 stride_xt, stride_as, stride_ar, stride_vt, T, H_IN, R, NR, k_per_split, MODE: tl.constexpr,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K1: tl.constexpr,
                 BLOCK_R: tl.constexpr, R_BLOCKS: tl.constexpr, STAGES: tl.constexpr, SUM_AFTER: tl.constexpr,
                 IEEE: tl.constexpr):
    """Split pid_k and rank block pid_r of row program (or work item) m; `single`: one token, on the CUDA
    cores (HYBRID's first items)."""
    if MODE == 3:
        if single:
            _shrink_rows(x_ptr, a_ptr, v_ptr, ws_ptr, lock_ptr, m, pid_k, pid_r, n_r, start, end, slot, rank,
                         stride_xt, stride_as, stride_ar, stride_vt, T, H_IN, R, NR, k_per_split,
                         SPLIT_K, 1, BLOCK_K1, BLOCK_R, R_BLOCKS, STAGES, SUM_AFTER, IEEE)
        else:
            _shrink_rows(x_ptr, a_ptr, v_ptr, ws_ptr, lock_ptr, m, pid_k, pid_r, n_r, start, end, slot, rank,
                         stride_xt, stride_as, stride_ar, stride_vt, T, H_IN, R, NR, k_per_split,
                         SPLIT_K, BLOCK_M, BLOCK_K, BLOCK_R, R_BLOCKS, STAGES, SUM_AFTER, IEEE)
    else:
        _shrink_rows(x_ptr, a_ptr, v_ptr, ws_ptr, lock_ptr, m, pid_k, pid_r, n_r, start, end, slot, rank,
                     stride_xt, stride_as, stride_ar, stride_vt, T, H_IN, R, NR, k_per_split,
                     SPLIT_K, BLOCK_M, BLOCK_K, BLOCK_R, R_BLOCKS, STAGES, SUM_AFTER, IEEE)


@_jit(do_not_specialize=["T", "seg_blocks", "n_single"])
def _shrink_kernel(x_ptr, a_ptr, rank_ptr, indptr_ptr, seg_slot_ptr, token_slot_ptr, v_ptr, ws_ptr, lock_ptr,
                   count_ptr, stride_xt, stride_as, stride_ar, stride_vt, T, H_IN, R, NR, seg_blocks, k_per_split,
                   n_single, n_r, MODE: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_K1: tl.constexpr, BLOCK_R: tl.constexpr, R_BLOCKS: tl.constexpr,
                   STAGES: tl.constexpr, PERSISTENT: tl.constexpr, SUM_AFTER: tl.constexpr, IEEE: tl.constexpr,
                   PDL: tl.constexpr):
    """PERSISTENT (work lists with item counts): a fixed grid walks the units (real item, split, rank block)
    of the step, so the padding of a graph's list costs no programs; else a program per unit of the grid
    (row program or item, split, rank block)."""
    pdl_start(PDL)
    if PERSISTENT:
        per_item = SPLIT_K * n_r
        n_s = tl.load(count_ptr)
        n_units = (n_s + tl.load(count_ptr + 1)) * per_item
        for u in range(tl.program_id(0), n_units, tl.num_programs(0)):
            single, m, start, end, slot = _real_item(u, n_units, per_item, n_s, n_single, indptr_ptr)
            if (slot != 0) & (start < end):
                rank = tl.minimum(tl.load(rank_ptr + slot), R)
                _shrink_item(x_ptr, a_ptr, v_ptr, ws_ptr, lock_ptr, m, (u % per_item) // n_r, u % n_r, n_r, single,
                             start, end, slot, rank, stride_xt, stride_as, stride_ar, stride_vt, T, H_IN, R, NR,
                             k_per_split, MODE, SPLIT_K, BLOCK_M, BLOCK_K, BLOCK_K1, BLOCK_R, R_BLOCKS, STAGES,
                             SUM_AFTER, IEEE)
        return
    pid_m, start, end, slot, rank = _row_program(indptr_ptr, seg_slot_ptr, token_slot_ptr, rank_ptr, seg_blocks,
                                                 R, MODE, BLOCK_M)
    if (slot == 0) | (start >= end):
        return
    _shrink_item(x_ptr, a_ptr, v_ptr, ws_ptr, lock_ptr, pid_m, tl.program_id(1), tl.program_id(2), n_r,
                 pid_m < n_single, start, end, slot, rank, stride_xt, stride_as, stride_ar, stride_vt, T, H_IN, R,
                 NR, k_per_split, MODE, SPLIT_K, BLOCK_M, BLOCK_K, BLOCK_K1, BLOCK_R, R_BLOCKS, STAGES, SUM_AFTER, IEEE)


@_jit()
def _expand_rows(v_ptr, b_ptr, y_ptr, pid_n, start, end, slot, rank, stride_vt, stride_bs, stride_bn,
                 stride_yt, R, N, O1, O2, TILES1, TILES2, s_ptr, stride_ss, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNKS: tl.constexpr,
                 TILES_PER_PROGRAM: tl.constexpr, STAGES: tl.constexpr, IEEE: tl.constexpr, OVERWRITE: tl.constexpr,
                 HAS_SCALE: tl.constexpr):
    """y[start:end, tiles of program pid_n] += v[start:end] @ lora_b[slot, tiles].T (see the kernel); with
    OVERWRITE, = instead of +=; with HAS_SCALE, the sum times scale[slot, tiles] (DoRA)."""
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    y_rows = y_ptr + offs_m[:, None].to(tl.int64) * stride_yt
    b_slot = b_ptr + slot.to(tl.int64) * stride_bs
    for i in tl.range(0, TILES_PER_PROGRAM, num_stages=STAGES):
        tile = pid_n * TILES_PER_PROGRAM + i  # tiles past the last one are fully masked
        sl = (tile >= TILES1).to(tl.int32) + (tile >= TILES2).to(tl.int32)  # output slice of this tile
        n_lo = tl.where(sl == 0, 0, tl.where(sl == 1, O1, O2))
        n_hi = tl.where(sl == 0, O1, tl.where(sl == 1, O2, N))
        n0 = n_lo + (tile - tl.where(sl == 0, 0, tl.where(sl == 1, TILES1, TILES2))) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        mask = m_mask[:, None] & n_mask[None, :]
        if not OVERWRITE:
            y = tl.load(y_rows + offs_n[None, :], mask=mask, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(R_CHUNKS):
            offs_r = c * BLOCK_R + tl.arange(0, BLOCK_R)
            r_mask = (offs_r < rank) & (n0 < n_hi)  # a tile past the end reads no v
            vt = tl.load(v_ptr + offs_m[:, None] * stride_vt + (sl * R + offs_r)[None, :],
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            bt = tl.load(b_slot + offs_n[:, None] * stride_bn + offs_r[None, :],
                         mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            if BLOCK_M >= 16:
                if IEEE:
                    acc = tl.dot(vt.to(bt.dtype), tl.trans(bt), acc, input_precision="ieee")
                else:
                    acc = tl.dot(vt.to(bt.dtype), tl.trans(bt), acc)
            else:  # BLOCK_M == 1: [BLOCK_N, BLOCK_R] * [1, BLOCK_R] summed over r
                acc += tl.sum(bt.to(tl.float32) * vt.to(tl.float32), axis=1)[None, :]
        if not OVERWRITE:
            acc = y.to(tl.float32) + acc
        if HAS_SCALE:  # rounded to y's dtype first, as the reference adds, then multiplies
            g = tl.load(s_ptr + slot.to(tl.int64) * stride_ss + offs_n, mask=n_mask, other=1.0).to(tl.float32)
            acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32) * g[None, :]
        tl.store(y_rows + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@_jit()
def _expand_item(v_ptr, b_ptr, slot_rank, y_ptr, pid_n, single, start, end, slot, stride_vt, stride_bs,
                 stride_bn, stride_yt, R, N, O1, O2, TILES1, TILES2, s_ptr, stride_ss, MODE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNKS: tl.constexpr,
                 TILES_PER_PROGRAM: tl.constexpr, STAGES: tl.constexpr, IEEE: tl.constexpr,
                 OVERWRITE: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Column program pid_n of one row program or work item (rows start:end of one slot; `single`: one token,
    on the CUDA cores: HYBRID's first items); `slot_rank`: the slot's entry of the rank table."""
    rank = tl.minimum(slot_rank, R)
    if OVERWRITE:
        rank = tl.where(slot == 0, 0, rank)  # slot 0: every v and B load masked, zeros written
        busy = start < end
    else:
        busy = (slot != 0) & (start < end)
    if busy:
        if MODE == 3:
            if single:
                _expand_rows(v_ptr, b_ptr, y_ptr, pid_n, start, end, slot, rank, stride_vt, stride_bs, stride_bn,
                             stride_yt, R, N, O1, O2, TILES1, TILES2, s_ptr, stride_ss, 1, BLOCK_N, BLOCK_R,
                             R_CHUNKS, TILES_PER_PROGRAM, STAGES, IEEE, OVERWRITE, HAS_SCALE)
            else:
                _expand_rows(v_ptr, b_ptr, y_ptr, pid_n, start, end, slot, rank, stride_vt, stride_bs, stride_bn,
                             stride_yt, R, N, O1, O2, TILES1, TILES2, s_ptr, stride_ss, BLOCK_M, BLOCK_N, BLOCK_R,
                             R_CHUNKS, TILES_PER_PROGRAM, STAGES, IEEE, OVERWRITE, HAS_SCALE)
        else:
            _expand_rows(v_ptr, b_ptr, y_ptr, pid_n, start, end, slot, rank, stride_vt, stride_bs, stride_bn,
                         stride_yt, R, N, O1, O2, TILES1, TILES2, s_ptr, stride_ss, BLOCK_M, BLOCK_N, BLOCK_R,
                         R_CHUNKS, TILES_PER_PROGRAM, STAGES, IEEE, OVERWRITE, HAS_SCALE)


@_jit(do_not_specialize=["seg_blocks", "n_single"])
def _expand_kernel(v_ptr, b_ptr, rank_ptr, indptr_ptr, seg_slot_ptr, token_slot_ptr, count_ptr, y_ptr, s_ptr,
                   stride_vt, stride_bs, stride_bn, stride_yt, stride_ss, R, seg_blocks, N, O1, O2, TILES1, TILES2,
                   n_single, COLS, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, R_CHUNKS: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
                   STAGES: tl.constexpr, PERSISTENT: tl.constexpr, IEEE: tl.constexpr, OVERWRITE: tl.constexpr,
                   HAS_SCALE: tl.constexpr, PDL: tl.constexpr):
    """y += v @ B per row program and output tile; OVERWRITE (row programs that cover every token: token
    mode, work lists with items_cover): y = v @ B, and rows without an adapter are written zero. HAS_SCALE
    (DoRA): the rows of an adapter's tokens become (y + v @ B) * scale[slot] (scale [slots, N]).
    PERSISTENT (work lists with item counts): a fixed grid walks the units (real item, column program) of
    the step, item-major, so the padding of a graph's list costs no programs."""
    pdl_start(PDL)
    if PERSISTENT:
        # A unit's loads depend on each other (item -> slot -> rank -> weights); the walk issues the item two
        # units ahead and its rank one unit ahead. Chain at batch 128 (256-token chunk among 127 decodes, 16 per
        # SM): 190/160/105/69 us against 195/162/105/69 unpipelined; the same in the shrink lost (sgmv_NOTES.md)
        n_s = tl.load(count_ptr)
        n_units = (n_s + tl.load(count_ptr + 1)) * COLS
        step = tl.num_programs(0)
        u0 = tl.program_id(0)
        single, _, start, end, slot = _real_item(u0, n_units, COLS, n_s, n_single, indptr_ptr)
        rank = tl.load(rank_ptr + slot)
        single1, _, start1, end1, slot1 = _real_item(u0 + step, n_units, COLS, n_s, n_single, indptr_ptr)
        for u in range(u0, n_units, step):
            single2, _, start2, end2, slot2 = _real_item(u + 2 * step, n_units, COLS, n_s, n_single, indptr_ptr)
            rank1 = tl.load(rank_ptr + slot1)
            _expand_item(v_ptr, b_ptr, rank, y_ptr, u % COLS, single, start, end, slot, stride_vt, stride_bs,
                         stride_bn, stride_yt, R, N, O1, O2, TILES1, TILES2, s_ptr, stride_ss, MODE, BLOCK_M,
                         BLOCK_N, BLOCK_R, R_CHUNKS, TILES_PER_PROGRAM, STAGES, IEEE, OVERWRITE, HAS_SCALE)
            single, start, end, slot, rank = single1, start1, end1, slot1, rank1
            single1, start1, end1, slot1 = single2, start2, end2, slot2
        return
    pid_m = tl.program_id(0)
    start, end, slot = _row_block(pid_m, indptr_ptr, seg_slot_ptr, token_slot_ptr, seg_blocks, MODE, BLOCK_M)
    _expand_item(v_ptr, b_ptr, tl.load(rank_ptr + slot), y_ptr, tl.program_id(1), pid_m < n_single, start, end,
                 slot, stride_vt, stride_bs, stride_bn, stride_yt, R, N, O1, O2, TILES1, TILES2, s_ptr, stride_ss,
                 MODE, BLOCK_M, BLOCK_N, BLOCK_R, R_CHUNKS, TILES_PER_PROGRAM, STAGES, IEEE, OVERWRITE, HAS_SCALE)


# ---- Wrappers (launch configuration: sgmv_launch.py) ---------------------------------------------

def _tiling(plan: SegmentPlan, T: int) -> tuple[int, ...]:
    """The lru-cache key of a plan's row tiling: (T, S, L, items, item_rows, num_single)."""
    n = 0 if plan.items is None else plan.items.shape[0]
    return T, plan.num_segments, plan.max_seg_len, n, plan.item_rows, plan.num_single


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETED = triton is not None and not isinstance(_shrink_kernel, triton.runtime.JITFunction)


def _check_triton(tensors: dict[str, torch.Tensor], slot_rank: torch.Tensor, plan: SegmentPlan,
                  T: int) -> None:
    """Raise ValueError for dtypes, strides or devices the kernels cannot take."""
    if triton is None:
        raise ValueError("the Triton SGMV kernels need the `triton` package; use backend='torch'")
    device = next(iter(tensors.values())).get_device()
    if device < 0 and not _INTERPRETED:
        raise ValueError("the Triton SGMV kernels need CUDA tensors (on CPU: set TRITON_INTERPRET=1 before "
                         "importing triton)")
    for name, t in tensors.items():
        if t.dtype not in _FLOATS or t.get_device() != device or t.stride(-1) != 1:
            raise ValueError(f"{name} must be fp16/bf16/fp32 with unit stride in its last dimension, on the "
                             f"device of the others; got {t.dtype}, strides {t.stride()}, on {t.device}")
    key = (id(slot_rank), device, T)  # a step's plan serves every projection: check it once per step
    if plan.__dict__.get("_checked") == key:
        return
    _check_plan(slot_rank, plan, T, device)
    plan.__dict__["_checked"] = key


def _check_plan(slot_rank: torch.Tensor, plan: SegmentPlan, T: int, device: int) -> None:
    ints = dict(slot_rank=slot_rank, seg_indptr=plan.seg_indptr, seg_slot=plan.seg_slot,
                token_slot=plan.token_slot)
    for name, t in ints.items():
        if t.dtype != torch.int32 or t.get_device() != device or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D int32 tensor on the device of the others, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if len(plan.seg_indptr) != plan.num_segments + 1 or len(plan.seg_slot) != plan.num_segments:
        raise ValueError(f"plan has {plan.num_segments} segments but seg_indptr "
                         f"{tuple(plan.seg_indptr.shape)} and seg_slot {tuple(plan.seg_slot.shape)}")
    if len(plan.token_slot) != T:
        raise ValueError(f"plan.token_slot has {len(plan.token_slot)} entries for {T} tokens")
    items = plan.items
    if items is not None and (items.dtype != torch.int32 or items.get_device() != device or items.dim() != 2
                              or items.shape[1] != 3 or not items.is_contiguous() or plan.item_rows < 1):
        raise ValueError(f"plan.items must be a contiguous [N, 3] int32 tensor on the device of the others "
                         f"with item_rows >= 1, got {items.dtype} {tuple(items.shape)} on {items.device}, "
                         f"item_rows {plan.item_rows}")
    count = plan.item_count
    if count is not None and (items is None or count.dtype != torch.int32 or count.get_device() != device
                              or tuple(count.shape) != (2,)):
        raise ValueError(f"plan.item_count must be a [2] int32 tensor on the device of the others, beside items; "
                         f"got {count.dtype} {tuple(count.shape)} on {count.device}")


def _check_slices(slice_offsets: tuple[int, ...]) -> None:
    if not 2 <= len(slice_offsets) <= 4 or slice_offsets[0] != 0 or any(
            b < a for a, b in zip(slice_offsets, slice_offsets[1:])):
        raise ValueError(f"slice_offsets must be 0 = off[0] <= ... with 1 to 3 slices, got {slice_offsets}")


def _shrink(x: torch.Tensor, lora_a: torch.Tensor, slot_rank: torch.Tensor, plan: SegmentPlan,
            v: torch.Tensor, n_slices: int) -> None:
    T, h_in = x.shape
    if T == 0 or plan.num_segments == 0 or plan.max_seg_len == 0:
        return
    NR = lora_a.shape[1]
    counted = plan.item_count is not None  # _check_plan: only beside items
    grid, tail, warps, split_k = _shrink_config(_tiling(plan, T), h_in, NR, n_slices, _num_sms(x.get_device()),
                                                counted)
    ws = torch.empty(split_k, T, NR, dtype=torch.float32, device=x.device) if split_k > 1 else v
    locks = _lock_buffer(x.device) if split_k > 1 else v
    indptr = plan.seg_indptr if plan.items is None else plan.items
    count = plan.item_count if counted else plan.token_slot  # read only by the persistent kernel
    tensors = (x, lora_a, slot_rank, indptr, plan.seg_slot, plan.token_slot, v, ws, locks, count)
    strides = (x.stride(0), lora_a.stride(0), lora_a.stride(1), v.stride(0))
    _launch(_shrink_kernel, grid, tensors, strides, (T,), (*tail, x.dtype == torch.float32), warps)


def _expand(v: torch.Tensor, lora_b: torch.Tensor, slot_rank: torch.Tensor, plan: SegmentPlan,
            y: torch.Tensor, slice_offsets: tuple[int, ...], overwrite: bool = False,
            scale: torch.Tensor | None = None) -> None:
    """y += v @ B; with `overwrite`, y = v @ B (zero rows without an adapter): in the kernel where its row
    programs cover every token (token mode, work lists with items_cover, segments from row 0 to the last), else
    by zeroing y first; with `scale` ([slots, N], DoRA, not with overwrite), adapters' rows times it."""
    T = y.shape[0]
    if T == 0 or plan.num_segments == 0 or plan.max_seg_len == 0:
        if overwrite:
            y.zero_()
        return
    tiling = _tiling(plan, T)
    counted = plan.item_count is not None  # _check_plan: only beside items
    grid, tail, warps = _expand_config(tiling, tuple(slice_offsets), lora_b.shape[2], _num_sms(y.get_device()),
                                       counted)
    if overwrite and not _covers(plan, _row_tiling(*tiling)[0], T):
        y.zero_()
        overwrite = False
    indptr = plan.seg_indptr if plan.items is None else plan.items
    count = plan.item_count if counted else plan.token_slot  # read only by the persistent kernel
    tensors = (v, lora_b, slot_rank, indptr, plan.seg_slot, plan.token_slot, count, y, y if scale is None else scale)
    strides = (v.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0), 0 if scale is None else scale.stride(0))
    _launch(_expand_kernel, grid, tensors, strides, (),
            (*tail, lora_b.dtype == torch.float32, overwrite, scale is not None), warps)


def _covers(plan: SegmentPlan, mode: int, T: int) -> bool:
    """Whether the row programs of this tiling cover every one of the T tokens (slot-0 ones included)."""
    if mode == TOKEN:
        return True
    if plan.items is not None:
        return plan.items_cover
    return mode == SEGMENT and plan.host_indptr[0] == 0 and plan.host_indptr[-1] == T


def sgmv_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, slot_rank: torch.Tensor, plan: SegmentPlan,
                       v: torch.Tensor, num_slices: int | None = None) -> None:
    """v[t, :] = x[t] @ lora_a[slot(t)].T for every token of a segment with slot != 0 (others untouched).

    x: [T, h_in]; lora_a: [slots, n*R, h_in]; slot_rank: [slots] int32; v: [T, n*R], written in place.
    With `num_slices` = n given, rows i*R + r with r >= slot_rank[slot] are known zero and not read (their
    v columns are written as zeros); without it every row of lora_a is read.
    """
    n = num_slices or 1
    if x.dim() != 2 or lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1] or lora_a.shape[1] % n or \
            v.dim() != 2 or tuple(v.shape) != (x.shape[0], lora_a.shape[1]) or x.dtype != lora_a.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype}, lora_a {tuple(lora_a.shape)} {lora_a.dtype} and "
                         f"v {tuple(v.shape)} must be [T, h_in], [slots, {n}*R, h_in] of x's dtype and "
                         f"[T, {n}*R]")
    _check_triton(dict(x=x, lora_a=lora_a, v=v), slot_rank, plan, x.shape[0])
    if num_slices is None:
        slot_rank = torch.full_like(slot_rank, lora_a.shape[1])
    _shrink(x, lora_a, slot_rank, plan, v, n)


def sgmv_expand_triton(v: torch.Tensor, lora_b: torch.Tensor, slot_rank: torch.Tensor, plan: SegmentPlan,
                       y: torch.Tensor, slice_offsets: tuple[int, ...], scale: torch.Tensor | None = None) -> None:
    """y[t, off[i]:off[i+1]] += v[t, i*R:(i+1)*R] @ lora_b[slot(t), off[i]:off[i+1], :].T  (slot != 0); with
    `scale` (DoRA), then y[t] *= scale[slot(t)] in the same pass.

    v: [T, n*R]; lora_b: [slots, off[-1], R]; y: [T, off[-1]], updated in place; n <= 3. Only the first
    slot_rank[slot] columns of each slice of v are read (the rest multiply zero-padded B columns).
    """
    _check_slices(slice_offsets)
    n = len(slice_offsets) - 1
    if v.dim() != 2 or lora_b.dim() != 3 or y.dim() != 2 or v.shape[0] != y.shape[0] or \
            tuple(lora_b.shape[1:]) != (slice_offsets[-1], v.shape[1] // n) or v.shape[1] % n or \
            y.shape[1] != slice_offsets[-1] or y.dtype != lora_b.dtype:
        raise ValueError(f"v {tuple(v.shape)}, lora_b {tuple(lora_b.shape)} {lora_b.dtype} and y "
                         f"{tuple(y.shape)} {y.dtype} must be [T, {n}*R], [slots, {slice_offsets[-1]}, R] "
                         f"and [T, {slice_offsets[-1]}] of lora_b's dtype")
    check_scale(scale, False, lora_b, y)
    _check_triton(dict(v=v, lora_b=lora_b, y=y), slot_rank, plan, y.shape[0])
    _expand(v, lora_b, slot_rank, plan, y, slice_offsets, scale=scale)


def add_lora_triton(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    slot_rank: torch.Tensor, plan: SegmentPlan, slice_offsets: tuple[int, ...],
                    overwrite: bool = False, scale: torch.Tensor | None = None) -> None:
    """y += per-token LoRA delta: the Triton shrink into an fp32 v [T, n*R], then the Triton expand; with
    `overwrite`, y = that delta whatever y held (without zeroing y first where the row programs cover every
    token: token mode, work lists with items_cover).

    y: [T, off[-1]]; x: [T, h_in]; lora_a: [slots, n*R, h_in]; lora_b: [slots, off[-1], R];
    slot_rank: [slots] int32; 1 <= n <= 3 slices; `scale` [slots, off[-1]] (DoRA): the rows of tokens with an
    adapter times scale[slot], in the expand. No host sync; graph-capturable after one eager call.
    """
    check_scale(scale, overwrite, lora_b, y)
    if not plan.has_lora:
        if overwrite:
            y.zero_()
        return
    _check_slices(slice_offsets)
    check_shapes(x, lora_a, lora_b, slice_offsets, y)
    _check_triton(dict(x=x, lora_a=lora_a, lora_b=lora_b, y=y), slot_rank, plan, x.shape[0])
    if len(slot_rank) != lora_a.shape[0]:
        raise ValueError(f"slot_rank has {len(slot_rank)} entries for {lora_a.shape[0]} slots")
    v = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    _shrink(x, lora_a, slot_rank, plan, v, len(slice_offsets) - 1)
    _expand(v, lora_b, slot_rank, plan, y, slice_offsets, overwrite, scale)
