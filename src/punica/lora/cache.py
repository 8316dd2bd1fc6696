"""CPU cache of loaded adapters: bounded LRU; an evicted adapter is read from disk again on demand."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, TypeVar

W = TypeVar("W")  # the loaded adapter (lora/peft.py's LoRAWeights)


class AdapterCache(Generic[W]):
    def __init__(self, capacity: int, load: Callable[[str, str], W]):
        self.capacity = capacity
        self._load = load
        self._items: OrderedDict[str, W] = OrderedDict()
        self.loads = 0  # disk reads, for metrics

    def get(self, name: str, path: str) -> W:
        if name in self._items:
            self._items.move_to_end(name)
            return self._items[name]
        weights = self._load(name, path)
        self.loads += 1
        self.put(name, weights)
        return weights

    def put(self, name: str, weights: W) -> None:
        """Insert (or replace) as most recently used, evicting the least recently used beyond capacity."""
        self._items[name] = weights
        self._items.move_to_end(name)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def discard(self, name: str) -> None:
        self._items.pop(name, None)

    def pop(self, name: str) -> W:
        return self._items.pop(name)

    def __contains__(self, name: str) -> bool:
        return name in self._items
