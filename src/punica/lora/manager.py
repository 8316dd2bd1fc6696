"""Adapter residency: registry (name -> PEFT dir) -> CPU cache (LRU) -> device slots (LRU, pinned while
a running request uses them). Implements the scheduler's AdapterSlots protocol.

Residency is keyed by a load's key, not its name: `ref(name)` gives requests the key of the name's current
load. A name unloaded while requests still use it and then loaded again (other weights, same name) gets a
new key, so the old requests finish on the old weights and new ones get the new weights.

An adapter that waiting requests need and the CPU cache lacks is read from disk on a worker thread
(`prefetch`); the engine thread takes the result into the cache when it asks (`ready`), so a slow disk
stalls only the requests for that adapter, and a failed read fails only them (`read_error`).

A retired load still in use keeps its weights in memory outside the cache (`unregister`): once an adapter
is unloaded its directory may be deleted, and its requests in flight must not need it.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from punica.config import LoRAConfig, ModelConfig
from punica.errors import AdapterError, ConfigError, UnknownModelError
from punica.lora.cache import AdapterCache
from punica.lora.peft import CONFIG_FILE, WEIGHT_FILES, LoRAWeights, load_peft_adapter
from punica.lora.pool import AdapterPool
from punica.lora.slots import SlotTable

RELOAD = "\0"  # in a key: the name, RELOAD, and the reload's number

LIST_MAX = 20  # adapters named in an unknown-adapter error (a server may hold thousands)


class AdapterManager:
    def __init__(self, model_cfg: ModelConfig, lora_cfg: LoRAConfig, pool: AdapterPool, dtype: torch.dtype):
        for d in lora_cfg.allowed_lora_dirs:
            if not os.path.isdir(d):
                raise ConfigError(f"allowed_lora_dirs: {d!r} is not a directory")
        self.model_cfg = model_cfg
        self.cfg = lora_cfg
        self.pool = pool
        self.dtype = dtype
        self.paths: dict[str, str] = {}  # registered names -> their PEFT directories
        self.cache = AdapterCache(lora_cfg.max_cpu_loras, self._read)
        self.slots = SlotTable(lora_cfg.max_loras)
        self._keys: dict[str, str] = {}  # registered name -> the key of its current load
        self._key_paths: dict[str, str] = {}  # key -> directory, for current loads and retired ones in use
        self._refs: dict[str, int] = {}  # unfinished requests per key, retired ones included
        self._held: dict[str, LoRAWeights] = {}  # retired keys still in use -> their weights
        self._reloads = itertools.count(1)
        self._loads = itertools.count(1)
        self.load_ids: dict[str, int] = {}  # key -> a number no other load of any adapter ever gets
        self._confined: set[str] = set()  # keys loaded through check_allowed: every re-read checks again
        self.device_loads = 0
        self.device_evictions = 0
        self._reads: dict[str, Future] = {}  # disk reads on the worker thread, by adapter name
        self._read_errors: dict[str, Exception] = {}
        self._reader: ThreadPoolExecutor | None = None

    def _read(self, key: str, path: str) -> LoRAWeights:
        if key in self._confined:  # its files may have become links out of the allowed directories since
            self.check_allowed(path)
        weights = load_peft_adapter(key.partition(RELOAD)[0], path, self.model_cfg, self.cfg.max_lora_rank,
                                    self.dtype, self.cfg.enable_dora)
        return weights.pinned() if self.pool.slot_rank.is_cuda else weights  # the CPU cache is page-locked

    def check_allowed(self, path: str) -> None:
        """Refuse paths outside `allowed_lora_dirs` (dynamic loading from the network), the files an adapter is
        read from included: a directory inside may hold links to files outside."""
        roots = [os.path.realpath(d) for d in self.cfg.allowed_lora_dirs]

        def inside(p: str) -> bool:
            real = os.path.realpath(p)
            return any(os.path.commonpath([real, root]) == root for root in roots)

        if not inside(path):
            raise PermissionError(f"adapter path {path!r} is outside the allowed directories {roots}")
        for name in (CONFIG_FILE, *WEIGHT_FILES):
            file = os.path.join(path, name)
            if os.path.lexists(file) and not inside(file):
                raise PermissionError(f"{name} in adapter path {path!r} links outside the allowed directories {roots}")

    def read(self, name: str, path: str) -> LoRAWeights:
        """Read and validate the adapter at `path` for `register`, touching no state: any thread may call it,
        so a server reads on a worker thread while the engine thread keeps stepping."""
        self.check_name(name)
        return self._read(name, path)

    def check_name(self, name: str) -> None:
        """AdapterError unless `name` can be registered now."""
        if not name or RELOAD in name:
            raise AdapterError(f"adapter name {name!r} is empty or holds a NUL character")
        if name in self.paths:
            raise AdapterError(f"adapter {name!r} is already registered (from {self.paths[name]}); unload it first "
                               "or choose another name")

    def register(self, name: str, path: str, weights: LoRAWeights | None = None,
                 confined: bool = False) -> LoRAWeights:
        """Validate the adapter at `path` now (errors surface here, not mid-batch) and make it servable.
        `weights`: what `read(name, path)` returned, if it was read already. `confined`: a dynamic load,
        whose every read from disk (after eviction from the CPU cache, say) passes `check_allowed` again."""
        self.check_name(name)
        key = name if name not in self._key_paths else f"{name}{RELOAD}{next(self._reloads)}"  # old one in use
        if weights is None:
            if confined:
                self.check_allowed(path)
            weights = self._read(key, path)
        if confined:
            self._confined.add(key)
        self.paths[name], self._keys[name], self._key_paths[key] = path, key, path
        self.load_ids[key] = next(self._loads)
        self.cache.put(key, weights)  # the next request need not touch the disk
        return weights

    def unregister(self, name: str) -> Future | None:
        """New requests for `name` fail from now on; requests already in flight finish first (on the weights
        they started with, even if `name` is registered again or its directory deleted meanwhile). Returns
        the disk read that brings those weights into memory when the CPU cache no longer has them: the
        directory must stay until it is done."""
        if name not in self.paths:
            raise UnknownModelError(f"adapter {name!r} is not loaded")
        del self.paths[name]
        key = self._keys.pop(name)
        if not self._refs.get(key):
            self._forget(key)
            return None
        if key in self.cache:
            self._held[key] = self.cache.pop(key)
            return None
        if key not in self._reads:
            self._reads[key] = self._reader_pool().submit(self._read, key, self._key_paths[key])
        return self._reads[key]

    def resolve(self, name: str) -> None:
        if name not in self.paths:
            names = sorted(self.paths)
            listed = ", ".join(map(repr, names[:LIST_MAX]))
            if len(names) > LIST_MAX:
                listed += f" and {len(names) - LIST_MAX} more"
            raise UnknownModelError(f"unknown adapter {name!r}; loaded adapters: {listed or 'none'}")

    def ref(self, name: str) -> str:
        """Count one more request for `name`; returns the key (of its current load) it must use."""
        self.resolve(name)
        key = self._keys[name]
        self._refs[key] = self._refs.get(key, 0) + 1
        return key

    def unref(self, key: str) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            if self._keys.get(key.partition(RELOAD)[0]) != key:  # retired: unloaded (and maybe reloaded)
                self._forget(key)

    def _forget(self, key: str) -> None:
        self._confined.discard(key)
        self._key_paths.pop(key, None)
        self.load_ids.pop(key, None)
        self._reads.pop(key, None)
        self._read_errors.pop(key, None)
        self._held.pop(key, None)
        slot = self.slots.drop(key)
        if slot is not None:
            self.pool.clear(slot)
        self.cache.discard(key)

    def prefetch(self, key: str) -> None:
        """Start reading `key` from disk on the worker thread unless it is cached, placed or being read."""
        if key in self.cache or key in self._held or self.slots.slot_of(key) is not None or key in self._reads \
                or key in self._read_errors:
            return
        self._reads[key] = self._reader_pool().submit(self._read, key, self._key_paths[key])

    def _reader_pool(self) -> ThreadPoolExecutor:
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="punica-lora-read")
        return self._reader

    def ready(self, key: str) -> bool:
        """Whether acquiring `key` needs no disk read: placed in a slot, in the CPU cache or held (finished
        background reads are taken in here, on the caller's thread)."""
        read = self._reads.get(key)
        if read is not None and read.done():
            del self._reads[key]
            try:
                if self._keys.get(key.partition(RELOAD)[0]) == key:
                    self.cache.put(key, read.result())
                else:  # retired
                    self._held[key] = read.result()
                self.cache.loads += 1
            except Exception as exc:  # reported to the requests that need it, once
                self._read_errors[key] = exc
        return self.slots.slot_of(key) is not None or key in self.cache or key in self._held

    def read_error(self, key: str) -> Exception | None:
        """The error of the last background read of `key`, if it failed (cleared by reading it)."""
        return self._read_errors.pop(key, None)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)

    def is_active(self, key: str) -> bool:
        """In a slot and used by a running request: acquiring it needs no new slot and evicts nothing."""
        return self.slots.pins(key) > 0

    def can_acquire(self, key: str) -> bool:
        return self.slots.can_place(key)

    def acquire(self, key: str) -> int:
        weights = None
        if self.slots.slot_of(key) is None:  # read before placing: a failed read must not leave an empty slot
            weights = self._held[key] if key in self._held else self.cache.get(key, self._key_paths[key])
        slot, evicted, load = self.slots.place(key)
        if load:
            self.pool.write(slot, weights)
            self.device_loads += 1
            self.device_evictions += evicted is not None
        self.slots.pin(key)
        return slot

    def release(self, key: str) -> None:
        self.slots.unpin(key)
