"""Write this step's K/V into the paged pool: alone (store_kv), or with rope applied to q and k on the way
(rope_store_kv, one launch instead of two)."""

from __future__ import annotations

import torch

from punica.ops import pdl
from punica.ops.norm_rope import _angles, _check_delta, _load_sum, _rotate_heads, apply_rope_torch, rms_norm_torch
from punica.ops.pdl import pdl_start

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:  # the torch backend runs without Triton
    triton = tl = None
    _jit = lambda fn: fn  # noqa: E731


def store_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k_cache.flat[slot_mapping[t]] = k[t]; the same for v. Entries < 0 are padding and skipped.

    k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; slot_mapping: [T] int64
    (block_id * block_size + offset).
    """
    keep = slot_mapping >= 0
    idx = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[idx] = to_cache_dtype(k[keep], k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[idx] = to_cache_dtype(v[keep], v_cache.dtype)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the pool's dtype; into fp8, values beyond its range saturate (as the kernels' conversions do, whatever
    torch's own cast does with them)."""
    if dtype.itemsize == 1 and dtype.is_floating_point:
        bound = torch.finfo(dtype).max
        x = x.clamp(-bound, bound)
    return x.to(dtype)


@_jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     H_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """Program t: copy token t's [Hkv, D] keys and values to flat cache row slot_mapping[t] (skip if < 0)."""
    pdl_start(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h, d = tl.arange(0, BLOCK_H)[:, None], tl.arange(0, HEAD_DIM)[None, :]
    mask = h < H_KV
    dst = slot * (H_KV * HEAD_DIM) + h * HEAD_DIM + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_kv_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Raise ValueError unless the kernels that write the pool can take these (see store_kv_triton)."""
    h_kv, d = k_cache.shape[2:]
    if k.shape != v.shape or k.dim() != 3 or tuple(k.shape[1:]) != (h_kv, d) or k_cache.shape != v_cache.shape:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} must be [T, {h_kv}, {d}] for caches "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if slot_mapping.shape != (k.shape[0],) or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{k.shape[0]}] and k, v need a unit "
                         "stride in head_dim")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or d & (d - 1):
        raise ValueError("the caches must be contiguous with a power-of-two head_dim")


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """store_kv_torch in one launch (one program per token); k, v may be strided views (unit head_dim stride).

    k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] contiguous; slot_mapping: [T] int.
    """
    check_kv_args(k, v, k_cache, v_cache, slot_mapping)
    h_kv, d = k_cache.shape[2:]
    if k.shape[0] == 0:
        return
    _store_kv_kernel[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                                     v.stride(1), H_KV=h_kv, HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(h_kv),
                                     **pdl.options(k))


@_jit
def _rope_store_kv_kernel(q_ptr, k_ptr, v_ptr, dq_ptr, dk_ptr, dv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr,
                          cos_sin_ptr, slot_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                          BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_DELTA: tl.constexpr,
                          wq_ptr, wk_ptr, eps, NORM: tl.constexpr, ROUND_FIRST: tl.constexpr, PDL: tl.constexpr):
    """Program t: rotate token t's q heads into q_out, and its k heads into KV-pool row slot_mapping[t] with
    its v heads beside them (neither when that row is < 0: padding); with HAS_DELTA, q, k, v plus dq, dk, dv
    (a LoRA delta not yet added, same strides) first; with NORM, q's and k's heads RMS-normalized (weights wq,
    wk) before the rotation."""
    pdl_start(PDL)
    t = tl.program_id(0)
    cos, sin = _angles(cos_sin_ptr, pos_ptr, t, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, q_out_ptr, t, t, stride_qt, stride_qh, cos, sin, HQ, HALF, BLOCK_HQ, BLOCK_HALF,
                  dq_ptr, HAS_DELTA, wq_ptr, eps, NORM, ROUND_FIRST)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        _rotate_heads(k_ptr, k_cache_ptr, t, slot, stride_kt, stride_kh, cos, sin, HKV, HALF, BLOCK_HKV,
                      BLOCK_HALF, dk_ptr, HAS_DELTA, wk_ptr, eps, NORM, ROUND_FIRST)
        h, d = tl.arange(0, BLOCK_HKV)[:, None], tl.arange(0, 2 * BLOCK_HALF)[None, :]
        mask = (h < HKV) & (d < 2 * HALF)
        v = _load_sum(v_ptr, dv_ptr, t * stride_vt + h * stride_vh + d, mask, HAS_DELTA).to(v_ptr.dtype.element_ty)
        tl.store(v_cache_ptr + (slot * HKV + h) * (2 * HALF) + d, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_store_kv_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, delta: tuple | None = None,
                        qk_norm: tuple | None = None) -> torch.Tensor:
    """apply_rope, then store_kv of the rotated k and of v (ops/kv_store.py); returns the rotated q. `delta`:
    (dq, dk, dv), a LoRA delta not yet added to q, k, v (each sum rounded to their dtype first). `qk_norm`:
    (q weight [D], k weight [D], eps), an RMSNorm over each head of q and k before the rotation (Qwen3)."""
    if delta is not None:
        q, k, v = q + delta[0], k + delta[1], v + delta[2]
    if qk_norm is not None:
        q, k = rms_norm_torch(q, qk_norm[0], qk_norm[2]), rms_norm_torch(k, qk_norm[1], qk_norm[2])
    q, k = apply_rope_torch(q, k, positions, cos_sin)
    store_kv_torch(k, v, k_cache, v_cache, slot_mapping)
    return q


def rope_store_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, delta: tuple | None = None,
                         qk_norm: tuple | None = None) -> torch.Tensor:
    """rope_store_kv_torch in one launch (one program per token); q, k, v may be strided views, and each part
    of delta must have the strides of its counterpart; qk_norm's weights are contiguous [D].

    q: [T, Hq, D]; k, v: [T, Hkv, D]; positions, slot_mapping: [T] int; cos_sin: [max_positions, D] fp32;
    k_cache, v_cache: [num_blocks, block_size, Hkv, D] contiguous. Returns q rotated, [T, Hq, D].
    """
    t, h_q, d = q.shape
    check_kv_args(k, v, k_cache, v_cache, slot_mapping)
    if d % 2 or q.stride(2) != 1 or positions.shape != (t,) or tuple(cos_sin.shape[1:]) != (d,) \
            or not cos_sin.is_contiguous() or k.shape[0] != t:
        raise ValueError(f"q {tuple(q.shape)} (even D, unit last stride), positions {tuple(positions.shape)} and "
                         f"cos_sin {tuple(cos_sin.shape)} (contiguous) must be [T, Hq, D], [T], [max_positions, D]")
    for name, x, dx in zip("qkv", (q, k, v), delta or (None,) * 3):
        _check_delta(name, x, dx)
    wq, wk, eps = qk_norm or (q, k, 0.0)
    if qk_norm is not None and (wq.shape != (d,) or wk.shape != (d,) or not wq.is_contiguous()
                                or not wk.is_contiguous() or wq.dtype != wk.dtype):
        raise ValueError(f"qk_norm weights must be contiguous [{d}] of one dtype, got {tuple(wq.shape)} "
                         f"{wq.dtype}, {tuple(wk.shape)} {wk.dtype}")
    q_out = torch.empty((t, h_q, d), dtype=q.dtype, device=q.device)
    if t:
        h_kv = k.shape[1]
        _rope_store_kv_kernel[(t,)](q, k, v, *(delta or (q, k, v)), q_out, k_cache, v_cache, positions,
                                    cos_sin.float(), slot_mapping, q.stride(0), q.stride(1), k.stride(0),
                                    k.stride(1), v.stride(0), v.stride(1), HQ=h_q, HKV=h_kv, HALF=d // 2,
                                    BLOCK_HQ=triton.next_power_of_2(h_q), BLOCK_HKV=triton.next_power_of_2(h_kv),
                                    BLOCK_HALF=triton.next_power_of_2(d // 2), HAS_DELTA=delta is not None,
                                    wq_ptr=wq, wk_ptr=wk, eps=eps, NORM=qk_norm is not None,
                                    ROUND_FIRST=wq.dtype == q.dtype, **pdl.options(q))
    return q_out
