"""Host-side adapter residency: device slot LRU with pins, the bounded CPU cache, and reads that leave nothing
behind."""

from __future__ import annotations

import gc
import os
import tracemalloc

import pytest

from punica.lora.cache import AdapterCache
from punica.lora.peft import load_tensors
from punica.lora.slots import SlotTable


def test_slots_evict_least_recently_used_unpinned():
    t = SlotTable(2)
    assert t.place("a") == (1, None, True)
    assert t.place("b") == (2, None, True)
    assert t.place("a") == (1, None, False)  # hit: now "b" is the least recently used
    slot, evicted, load = t.place("c")
    assert (slot, evicted, load) == (2, "b", True) and t.resident() == ["a", "c"]


def test_pinned_slots_are_never_evicted():
    t = SlotTable(2)
    for name in ("a", "b"):
        t.place(name)
        t.pin(name)
    assert not t.can_place("c")
    with pytest.raises(RuntimeError, match="pinned"):
        t.place("c")
    t.unpin("a")
    assert t.can_place("c") and t.place("c") == (1, "a", True)
    with pytest.raises(RuntimeError, match="in use"):
        t.drop("b")
    t.unpin("b")
    assert t.drop("b") == 2 and t.slot_of("b") is None and t.place("d")[0] == 2


def test_cpu_cache_is_bounded_and_reloads_on_demand():
    reads = []
    cache = AdapterCache(2, lambda name, path: reads.append(name) or f"w-{name}")
    assert cache.get("a", "/a") == "w-a" and cache.get("b", "/b") == "w-b"
    cache.get("a", "/a")  # hit
    cache.get("c", "/c")  # evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    cache.get("b", "/b")
    assert reads == ["a", "b", "c", "b"] and cache.loads == 4
    cache.put("z", "w-z")
    assert "z" in cache and len([n for n in "abcz" if n in cache]) == 2


def test_reading_an_adapter_keeps_nothing_alive(tiny_models):
    """A server loads and unloads adapters for as long as it runs: reading one must leave no memory behind
    (safetensors' load_file kept about 50 bytes a tensor alive per call)."""

    path = tiny_models["llama"][2]["a4"]
    assert os.path.isfile(os.path.join(path, "adapter_model.safetensors"))
    for _ in range(3):
        load_tensors(path)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100):
            load_tensors(path)
        gc.collect()
        kept = (tracemalloc.get_traced_memory()[0] - before) / 100
    finally:
        tracemalloc.stop()
    assert kept < 64, f"{kept:.0f} bytes kept alive per read"
