"""Adapters loaded while serving: by POST /v1/load_lora_adapter, or on demand by the first request that names
one (ServerConfig.load_loras_on_demand). Either way only from the allowed directories, read and validated on a
worker thread: on the engine thread a large adapter would stall every stream."""

from __future__ import annotations

import asyncio
import functools
import os
import time

from punica import AdapterError, BadRequestError
from punica.lora.gguf_lora import is_gguf_adapter
from punica.lora.peft import CONFIG_FILE
from punica.server.async_engine import AsyncEngine
from punica.server.metrics import ServerMetrics


class AdapterLoads:
    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, model_name: str, on_demand: bool):
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.on_demand_enabled = on_demand
        self.started = int(time.time())
        self.loaded: dict[str, int] = {}  # adapter -> when it was loaded (/v1/models' `created`)
        self._loading: dict[str, asyncio.Task] = {}  # on-demand loads in progress

    async def load(self, name: str, path: str) -> None:
        """Serve the PEFT directory (or llama.cpp LoRA .gguf file) `path`, which must lie inside an allowed
        directory, as `name`."""
        if name == self.model_name:
            raise BadRequestError(f"{name!r} is the base model's name; choose another adapter name")
        engine = self.engine.engine
        if not engine.config.lora.allowed_lora_dirs:
            raise PermissionError("dynamic adapter loading is off: start the server with --allowed-lora-dir DIR")
        engine.adapters.check_allowed(path)
        if not os.path.isdir(path) and not is_gguf_adapter(path):
            raise AdapterError(f"adapter path {path!r} is neither a PEFT adapter directory nor a llama.cpp LoRA .gguf "
                               "file")
        path = os.path.realpath(path)  # re-reads follow what was checked, not a symlink swapped later
        weights = await asyncio.to_thread(engine.read_lora, name, path)
        await self.engine.call(functools.partial(engine.add_lora, confined=True), name, path, weights)
        self.metrics.adapter_loaded(name)
        self.loaded[name] = int(time.time())

    def unloaded(self, name: str) -> None:
        self.metrics.adapter_unloaded(name)
        self.loaded.pop(name, None)

    async def on_demand(self, model: str) -> bool:
        """Load the adapter directory named `model` from an allowed directory, if loading on demand and there
        is one; whether `model` is served now. Requests for one name share its load (and its error)."""
        path = self._on_demand_path(model)
        if path is None:
            return False
        task = self._loading.get(model)
        if task is None:
            task = self._loading[model] = asyncio.create_task(self.load(model, path))
            task.add_done_callback(lambda _: self._loading.pop(model, None))
        await asyncio.shield(task)
        return True

    def _on_demand_path(self, model: str) -> str | None:
        """The adapter directory named `model` in an allowed directory (or its llama.cpp file `model`.gguf), or None
        (also for a name that is not one plain directory name, and when not loading on demand)."""
        if not self.on_demand_enabled or model in (".", "..") or os.path.basename(model) != model or "\0" in model:
            return None
        for root in self.engine.engine.config.lora.allowed_lora_dirs:
            path = os.path.join(root, model)
            if os.path.isfile(os.path.join(path, CONFIG_FILE)):
                return path
            if os.path.isfile(path + ".gguf"):  # a llama.cpp LoRA file, served under its name without .gguf
                return path + ".gguf"
        return None
