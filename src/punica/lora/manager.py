"""Adapter residency: registry (name -> PEFT dir) -> CPU cache (LRU) -> device slots (LRU, pinned while
a running request uses them). Implements the scheduler's AdapterSlots protocol.

An adapter that waiting requests need and the CPU cache lacks is read from disk on a worker thread
(`prefetch`); the engine thread takes the result into the cache when it asks (`ready`), so a slow disk
stalls only the requests for that adapter, and a failed read fails only them (`read_error`).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from punica.config import LoRAConfig, ModelConfig
from punica.errors import AdapterError, UnknownModelError
from punica.lora.cache import AdapterCache
from punica.lora.peft import LoRAWeights, load_peft_adapter
from punica.lora.pool import AdapterPool
from punica.lora.slots import SlotTable


class AdapterManager:
    def __init__(self, model_cfg: ModelConfig, lora_cfg: LoRAConfig, pool: AdapterPool, dtype: torch.dtype):
        self.model_cfg = model_cfg
        self.cfg = lora_cfg
        self.pool = pool
        self.dtype = dtype
        self.paths: dict[str, str] = {}
        self.cache = AdapterCache(lora_cfg.max_cpu_loras, self._read)
        self.slots = SlotTable(lora_cfg.max_loras)
        self._refs: dict[str, int] = {}  # unfinished requests per adapter, removed ones included
        self._retired: dict[str, str] = {}  # unloaded while in use: path kept until the last request ends
        self.device_loads = 0
        self.device_evictions = 0
        self._reads: dict[str, Future] = {}  # disk reads on the worker thread, by adapter name
        self._read_errors: dict[str, Exception] = {}
        self._reader: ThreadPoolExecutor | None = None

    def _read(self, name: str, path: str) -> LoRAWeights:
        weights = load_peft_adapter(name, path, self.model_cfg, self.cfg.max_lora_rank, self.dtype)
        return weights.pinned() if self.pool.slot_rank.is_cuda else weights  # the CPU cache is page-locked

    def check_allowed(self, path: str) -> None:
        """Refuse paths outside `allowed_lora_dirs` (dynamic loading from the network)."""
        real = os.path.realpath(path)
        roots = [os.path.realpath(d) for d in self.cfg.allowed_lora_dirs]
        if not any(os.path.commonpath([real, root]) == root for root in roots):
            raise PermissionError(f"adapter path {path!r} is outside the allowed directories {roots}")

    def register(self, name: str, path: str) -> LoRAWeights:
        """Validate the adapter at `path` now (errors surface here, not mid-batch) and make it servable."""
        if not name or name in self.paths:
            raise AdapterError(f"adapter name {name!r} is empty or already registered")
        weights = self._read(name, path)
        self.paths[name] = path
        self.cache.put(name, weights)  # the next request need not touch the disk
        return weights

    def unregister(self, name: str) -> None:
        """New requests for `name` fail from now on; requests already in flight finish first."""
        if name not in self.paths:
            raise UnknownModelError(f"adapter {name!r} is not loaded")
        path = self.paths.pop(name)
        if self._refs.get(name):
            self._retired[name] = path
        else:
            self._forget(name)

    def resolve(self, name: str) -> None:
        if name not in self.paths:
            raise UnknownModelError(f"unknown adapter {name!r}; loaded adapters: {sorted(self.paths)}")

    def ref(self, name: str) -> None:
        self.resolve(name)
        self._refs[name] = self._refs.get(name, 0) + 1

    def unref(self, name: str) -> None:
        self._refs[name] -= 1
        if not self._refs[name]:
            del self._refs[name]
            if name in self._retired:
                del self._retired[name]
                self._forget(name)

    def _forget(self, name: str) -> None:
        self._reads.pop(name, None)
        self._read_errors.pop(name, None)
        slot = self.slots.drop(name)
        if slot is not None:
            self.pool.clear(slot)
        self.cache.discard(name)

    def prefetch(self, name: str) -> None:
        """Start reading `name` from disk on the worker thread unless it is cached, placed or being read."""
        if name in self.cache or self.slots.slot_of(name) is not None or name in self._reads \
                or name in self._read_errors:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="punica-lora-read")
        self._reads[name] = self._reader.submit(self._read, name, self.paths.get(name) or self._retired[name])

    def ready(self, name: str) -> bool:
        """Whether acquiring `name` needs no disk read: placed in a slot or in the CPU cache (finished
        background reads are taken into the cache here, on the caller's thread)."""
        read = self._reads.get(name)
        if read is not None and read.done():
            del self._reads[name]
            try:
                self.cache.put(name, read.result())
                self.cache.loads += 1
            except Exception as exc:  # reported to the requests that need it, once
                self._read_errors[name] = exc
        return self.slots.slot_of(name) is not None or name in self.cache

    def read_error(self, name: str) -> Exception | None:
        """The error of the last background read of `name`, if it failed (cleared by reading it)."""
        return self._read_errors.pop(name, None)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)

    def is_active(self, name: str) -> bool:
        """In a slot and used by a running request: acquiring it needs no new slot and evicts nothing."""
        return self.slots.pins(name) > 0

    def can_acquire(self, name: str) -> bool:
        return self.slots.can_place(name)

    def acquire(self, name: str) -> int:
        weights = None
        if self.slots.slot_of(name) is None:  # read before placing: a failed read must not leave an empty slot
            weights = self.cache.get(name, self.paths.get(name) or self._retired[name])
        slot, evicted, load = self.slots.place(name)
        if load:
            self.pool.write(slot, weights)
            self.device_loads += 1
            self.device_evictions += evicted is not None
        self.slots.pin(name)
        return slot

    def release(self, name: str) -> None:
        self.slots.unpin(name)
