"""Write this step's K/V into the paged pool."""

from __future__ import annotations

import torch


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
