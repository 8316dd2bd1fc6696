"""How much device memory the KV cache may take: what is left of memory_fraction of the device once the
weights, the adapter slots and the largest eager step's activations (measured, not estimated) are counted."""

from __future__ import annotations

import logging

import torch

from punica.config import EngineConfig, ModelConfig
from punica.engine.request import MAX_LOGPROBS, SamplingParams, Sequence
from punica.engine.runner import host_batch, to_device_batch
from punica.errors import CapacityError
from punica.kv.block_manager import blocks_for
from punica.kv.cache import bytes_per_block, num_blocks_for
from punica.model.llama import LlamaModel
from punica.ops.sampling import sample_torch, token_logprobs

log = logging.getLogger("punica.engine")
# the largest step's measured activations times this are kept out of the KV cache: the caching allocator's
# rounding makes a real step of that size peak a few percent above the measurement (+7% seen on an H200)
STEP_RESERVE_MARGIN = 1.25


def kv_cache_blocks(model: LlamaModel, slot_rank: torch.Tensor, config: EngineConfig, model_cfg: ModelConfig,
                    max_len: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(KV blocks of `dtype`, bytes kept for the largest step). Call it once the weights and adapter slots are
    allocated and before anything else is; on CUDA it runs that step once (against a scratch KV pool)."""
    cache, sched = config.cache, config.scheduler
    reserve = 0
    if device.type == "cuda" and cache.num_blocks is None:
        try:
            reserve = int(STEP_RESERVE_MARGIN * peak_step_bytes(
                model, slot_rank, sched.max_num_batched_tokens, sched.max_num_seqs, max_len, cache.block_size,
                device, sched.max_prompt_logprob_tokens, dtype))
        except torch.OutOfMemoryError as exc:
            raise CapacityError(f"a step of max_num_batched_tokens={sched.max_num_batched_tokens} tokens does not fit "
                                f"in device memory beside the weights and adapter slots (max_loras="
                                f"{config.lora.max_loras}, max_lora_rank={config.lora.max_lora_rank}); lower one of "
                                "them") from exc
    useful = sched.max_num_seqs * blocks_for(max_len, cache.block_size)
    num_blocks = num_blocks_for(model_cfg, cache, dtype, device, useful, reserve)
    if device.type == "cuda":
        log.info("KV cache: %d blocks of %d tokens, %.2f GiB (%.2f GiB kept for a step of %d tokens)", num_blocks,
                 cache.block_size, num_blocks * bytes_per_block(model_cfg, cache.block_size, dtype) / 2 ** 30,
                 reserve / 2 ** 30, sched.max_num_batched_tokens)
    return num_blocks, reserve


@torch.inference_mode()
def peak_step_bytes(model: LlamaModel, slot_rank: torch.Tensor, max_tokens: int, max_seqs: int, max_len: int,
                    block_size: int, device: torch.device, logprob_rows: int,
                    kv_dtype: torch.dtype | None = None) -> int:
    """Device memory the largest eager step takes on top of what is allocated now, measured: a forward of
    `max_tokens` tokens (at most `max_len` each) over as many sequences as may share a step, all through an
    adapter slot if the pool has one, with top-k/top-p sampling of every sequence's last logits and prompt
    logprobs (MAX_LOGPROBS of them) of up to `logprob_rows` other positions (SchedulerConfig.
    max_prompt_logprob_tokens). It runs against a scratch KV pool (of `kv_dtype`, the model's by default), freed
    after, so the KV cache can be sized to what is left (see num_blocks_for)."""
    seqs = max(1, min(max_seqs, max_tokens))
    tokens = min(max_tokens, seqs * max_len)
    slot = 1 if len(slot_rank) > 1 else 0
    params = SamplingParams(prompt_logprobs=MAX_LOGPROBS)
    work, first = [], 0
    for i in range(seqs):
        n = tokens // seqs + (i < tokens % seqs)
        seq = Sequence(request_id=str(i), prompt_ids=[0] * n, params=params, slot=slot)
        seq.block_table = list(range(first, first + blocks_for(n, block_size)))
        first += len(seq.block_table)
        work.append((seq, n))
    hb = host_batch(work, block_size)  # logits rows: each sequence's last position, then every other one
    hb.logits_indices = hb.logits_indices[:seqs + logprob_rows]
    cfg = model.config
    model.bind_kv_cache(torch.zeros((cfg.num_layers, 2, first, block_size, cfg.num_kv_heads, cfg.head_dim),
                                    dtype=kv_dtype or model.embed_tokens.weight.dtype, device=device))
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        logits = model(to_device_batch(hb, slot_rank, device))
        sample_torch(logits[:seqs], [1.0] * seqs, [50] * seqs, [0.9] * seqs, [None] * seqs, [0.05] * seqs)
        rows = logits[seqs:]
        if len(rows):
            token_logprobs(rows, torch.zeros(len(rows), dtype=torch.int64, device=device), MAX_LOGPROBS)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    finally:
        model.bind_kv_cache(None)
        torch.cuda.empty_cache()
