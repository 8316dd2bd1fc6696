"""Write this step's K/V into the paged pool."""

from __future__ import annotations

import torch

from punica.ops import pdl
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
    k_cache.view(-1, *k_cache.shape[2:])[idx] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[idx] = v[keep].to(v_cache.dtype)


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
