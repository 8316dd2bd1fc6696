"""The KV pool: one tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""

from __future__ import annotations

import torch

from punica.config import CacheConfig, ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.kv_size * itemsize


def num_blocks_for(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device) -> int:
    """`cache.num_blocks` if set; else what fits in the memory budget of `device`."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = bytes_per_block(cfg, cache.block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - cache.memory_fraction) * total
    else:
        budget = cache.cpu_cache_bytes
    return max(1, int(budget // per_block))


def allocate_kv_pool(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)
