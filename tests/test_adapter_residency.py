"""Host-side adapter residency: device slot LRU with pins, and the bounded CPU cache."""

from __future__ import annotations

import pytest

from punica.lora.cache import AdapterCache
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
