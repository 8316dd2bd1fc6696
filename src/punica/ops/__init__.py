"""Kernels. Every op has a torch reference (`<op>_torch`, runs anywhere) and, where it pays, a Triton
kernel with the same signature (`<op>_triton`). `select_ops` picks one implementation per op, once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from punica.errors import ConfigError
from punica.ops import attention, gemm, kv_store, norm_rope, sgmv


@dataclass(frozen=True)
class Ops:
    """The op table a model runs with; each field has the signature of its torch reference."""

    backend: str
    linear: Callable
    linear_add: Callable
    add_lora: Callable
    sgmv_shrink: Callable
    sgmv_expand: Callable
    paged_attention: Callable
    store_kv: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    apply_rope: Callable
    rope_store_kv: Callable
    silu_and_mul: Callable


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """"auto" means triton on CUDA and torch elsewhere."""
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    if backend not in ("torch", "triton"):
        raise ConfigError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and sgmv.triton is None:
        raise ConfigError("backend 'triton' needs the triton package; install it or use --backend torch")
    if backend == "triton" and torch.device(device).type == "cpu" and not sgmv._INTERPRETED:
        raise ConfigError("backend 'triton' on the CPU runs in Triton's interpreter: set TRITON_INTERPRET=1 "
                          "before starting (slow; for tests), or use --backend torch")
    return backend


def select_ops(backend: str) -> Ops:
    """The op table for "torch" or "triton"; an op without a Triton kernel uses its reference."""
    modules = (gemm, sgmv, attention, kv_store, norm_rope)

    def pick(name: str) -> Callable:  # from the module that defines the reference, not one that imports it
        module = next(m for m in modules if getattr(getattr(m, f"{name}_torch", None), "__module__", "") == m.__name__)
        if backend == "triton" and hasattr(module, f"{name}_triton"):
            return getattr(module, f"{name}_triton")
        return getattr(module, f"{name}_torch")

    names = [f.name for f in Ops.__dataclass_fields__.values() if f.name != "backend"]
    return Ops(backend=backend, **{name: pick(name) for name in names})
