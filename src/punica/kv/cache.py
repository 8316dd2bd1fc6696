"""The KV pool: one tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""

from __future__ import annotations

import torch

from punica.config import CacheConfig, ModelConfig
from punica.errors import CapacityError


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.kv_size * itemsize


def num_blocks_for(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device,
                   max_useful: int, reserve: int = 0) -> int:
    """`cache.num_blocks` if set; else what fits in the memory budget of `device` once `reserve` bytes (the
    largest step's activations) are set aside, but no more than `max_useful` (every sequence at full length),
    so a small model does not take the whole device. On CUDA the budget is memory_fraction of the device less
    what is in use now (weights, adapter slots, other processes)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = bytes_per_block(cfg, cache.block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - cache.memory_fraction) * total - reserve
    else:
        budget = cache.cpu_cache_bytes
    if budget < per_block and device.type == "cuda":
        raise CapacityError(f"no device memory left for the KV cache: {free / 2**30:.2f} GiB free of "
                            f"{total / 2**30:.2f}, less {(1 - cache.memory_fraction) * total / 2**30:.2f} GiB kept "
                            f"back by memory_fraction={cache.memory_fraction} and {reserve / 2**30:.2f} GiB for the "
                            "largest step's activations, leaves no block; raise memory_fraction, lower "
                            "max_num_batched_tokens, max_loras or max_lora_rank, or free device memory")
    if budget < per_block:
        raise CapacityError(f"cpu_cache_bytes={cache.cpu_cache_bytes} holds no KV block of {per_block} bytes; "
                            "raise cpu_cache_bytes")
    return min(int(budget // per_block), max_useful)


def allocate_kv_pool(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)
