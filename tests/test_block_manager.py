from __future__ import annotations

import pytest
import torch

from punica.kv.block_manager import BlockManager, block_keys, blocks_for


@pytest.mark.parametrize("n,expected", [(0, 0), (1, 1), (15, 1), (16, 1), (17, 2), (31, 2), (32, 2), (33, 3)])
def test_blocks_for_page_boundaries(n, expected):
    assert blocks_for(n, 16) == expected


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 32, 33])
def test_grow_and_free_keep_the_invariant(n):
    bm = BlockManager(num_blocks=8, block_size=16)
    table: list[int] = []
    bm.grow(table, n)
    assert len(table) == blocks_for(n, 16)
    assert bm.num_free + bm.num_used == bm.num_blocks
    bm.grow(table, n + 1)  # one more token crosses into a new block exactly at multiples of 16
    assert len(table) == blocks_for(n + 1, 16)
    assert len(set(table)) == len(table)
    bm.free(table)
    assert table == [] and bm.num_free == 8


def test_grow_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=16)
    a, b = [], []
    bm.grow(a, 33)
    assert not bm.can_grow(b, 17)
    with pytest.raises(MemoryError):
        bm.grow(b, 17)
    assert b == [] and bm.num_free == 0
    bm.free(a)
    bm.grow(b, 17)
    assert bm.num_used == 2


def test_blocks_are_never_shared():
    bm = BlockManager(num_blocks=10, block_size=4)
    tables = [[] for _ in range(5)]
    for step in range(1, 9):
        for t in tables:
            if bm.can_grow(t, step):
                bm.grow(t, step)
    used = [b for t in tables for b in t]
    assert len(used) == len(set(used)) == bm.num_used


def test_cached_blocks_are_shared_counted_and_evicted_least_recently_used_first():
    bm = BlockManager(num_blocks=4, block_size=2, caching=True)
    keys = block_keys("ns", [1, 2, 3, 4, 5], 2)  # two full blocks; the fifth token is no block
    assert len(keys) == 2 and keys == block_keys("ns", [1, 2, 3, 4], 2)
    assert block_keys("other", [1, 2], 2) != keys[:1] and block_keys("ns", [1, 9, 3, 4], 2)[1] != keys[1]
    a: list[int] = []
    bm.grow(a, 5)
    bm.register(a, keys)
    assert bm.num_cached == 2 and bm.cached_prefix(keys) == (2, 0)  # referenced by a: shared without using free
    b: list[int] = []
    assert bm.take_cached(b, keys, bm.cached_prefix(keys)[0]) == 4 and b == a[:2]
    bm.free(a)  # b still references the two cached blocks; a's third block is free again
    assert bm.num_free == 2 and bm.cached_prefix(keys) == (2, 0)
    bm.free(b)
    assert bm.num_free == 4 and bm.num_cached == 2 and bm.cached_prefix(keys) == (2, 2)  # cached, unreferenced
    c: list[int] = []
    bm.grow(c, 4)  # two never-cached blocks first, then nothing is evicted
    assert bm.num_cached == 2
    bm.grow(c, 6)  # the least recently freed cached block goes: tables free tail first, so a chain loses its
    assert bm.num_cached == 1 and bm.cached_prefix(keys) == (1, 1)  # tail and its head stays usable
    assert bm.num_free + bm.num_used == bm.num_blocks
    assert (bm.queried_tokens, bm.hit_tokens, bm.evicted_blocks) == (4, 4, 1)


def test_register_keeps_the_first_block_of_a_key_and_caching_off_caches_nothing():
    bm = BlockManager(num_blocks=4, block_size=2, caching=True)
    keys = block_keys(None, [1, 2], 2)
    a, b = [], []
    bm.grow(a, 2)
    bm.grow(b, 2)
    bm.register(a, keys)
    bm.register(b, keys)  # computed twice at once: a's block stays the cached one, b's is freed as usual
    second = b[0]
    bm.free(b)
    assert bm.num_cached == 1 and bm.cached_prefix(keys) == (1, 0) and bm._free[-1] == second
    off = BlockManager(num_blocks=4, block_size=2)
    t: list[int] = []
    off.grow(t, 2)
    off.register(t, keys)
    assert off.num_cached == 0 and off.cached_prefix(keys) == (0, 0)


def test_kv_budget_on_cuda_leaves_the_step_reserve_and_names_it(monkeypatch):
    """On CUDA the KV cache gets memory_fraction of the device less what is in use and less the largest
    step's reserve; when nothing is left, the error gives each of the three."""
    from punica.config import CacheConfig, ModelConfig
    from punica.errors import CapacityError
    from punica.kv.cache import bytes_per_block, num_blocks_for

    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    per_block = bytes_per_block(cfg, 16, torch.float16)  # 2 x 2 layers x 16 tokens x 32 x 2 bytes = 4 KiB
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * gib, 100 * gib))
    cache, cuda = CacheConfig(block_size=16, memory_fraction=0.8), torch.device("cuda")
    # 30 GiB free - 20 GiB kept back - 4 GiB reserve = 6 GiB of blocks
    assert num_blocks_for(cfg, cache, torch.float16, cuda, 10 ** 9, 4 * gib) == 6 * gib // per_block
    assert num_blocks_for(cfg, cache, torch.float16, cuda, 10 ** 9) == 10 * gib // per_block
    assert num_blocks_for(cfg, cache, torch.float16, cuda, 100, 4 * gib) == 100  # capped at what is useful
    with pytest.raises(CapacityError, match=r"30.00 GiB free of 100.00, less 20.00 GiB kept back by "
                                            r"memory_fraction=0.8 and 10.00 GiB for the largest step"):
        num_blocks_for(cfg, cache, torch.float16, cuda, 100, 10 * gib)


def test_kv_cache_blocks_keep_the_measured_step_with_its_margin_and_name_a_step_too_big(monkeypatch):
    """engine.memory on CUDA (faked: the free memory and the step's measurement): the KV cache gets what is left
    after 1.25x the measured step; a step that does not fit at all is a CapacityError naming the settings."""
    from punica.config import ModelConfig, engine_config
    from punica.engine import memory
    from punica.errors import CapacityError
    from punica.kv.cache import bytes_per_block

    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    # enough sequences that every block is useful: the memory decides
    config = engine_config(model="m", memory_fraction=0.8, block_size=16, max_num_seqs=10 ** 5,
                           max_num_batched_tokens=10 ** 5)
    gib, cuda = 2 ** 30, torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * gib, 100 * gib))
    asked = []

    def measured(model, slot_rank, tokens, seqs, max_len, block_size, device, rows, kv_dtype):
        asked.append((tokens, seqs, max_len, block_size, rows, kv_dtype))
        return 4 * gib

    monkeypatch.setattr(memory, "peak_step_bytes", measured)
    blocks, reserve = memory.kv_cache_blocks(None, None, config, cfg, 256, torch.float16, cuda)
    assert reserve == 5 * gib and blocks == 5 * gib // bytes_per_block(cfg, 16, torch.float16)  # 30 - 20 - 5
    assert asked == [(10 ** 5, 10 ** 5, 256, 16, 512, torch.float16)]
    roomier = engine_config(model="m", memory_fraction=0.8, block_size=16, max_num_seqs=10 ** 6,
                            max_num_batched_tokens=10 ** 6)  # the doubled blocks all useful
    fp8_blocks, _ = memory.kv_cache_blocks(None, None, roomier, cfg, 256, torch.float8_e4m3fn, cuda)
    assert fp8_blocks == 2 * blocks and asked[-1][-1] == torch.float8_e4m3fn  # kv_cache_dtype "fp8"

    def too_big(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(memory, "peak_step_bytes", too_big)
    with pytest.raises(CapacityError, match=r"max_num_batched_tokens=100000 tokens does not fit .*max_loras=8, "
                                            r"max_lora_rank=64\); lower one"):
        memory.kv_cache_blocks(None, None, config, cfg, 256, torch.float16, cuda)
