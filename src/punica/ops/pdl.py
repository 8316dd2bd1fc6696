"""Programmatic dependent launch (PDL, compute capability 9.0 and later) for the Triton kernels.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still finishing.
Each of our kernels starts with `pdl_start`: it waits for the previous kernel's completion and memory
(griddepcontrol.wait) before touching any memory, then lets the next kernel launch. What overlaps is the
launch and block scheduling, never data. Results are bitwise those without PDL.

On by default: on an H200 it took the batch-32 decode graph from 7.5 to 7.3 ms (distinct adapters) and 6.2
to 6.1 ms (no adapters), and text generation 1-2% up (benchmarks/results/textgen_NOTES.md). `set_pdl(False)`
or the benchmarks' `--no-pdl` turn it off. The setting is read when a kernel is launched, so CUDA graphs keep
the one they were captured with.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend runs without Triton
    triton = tl = None

_enabled = True


def set_pdl(enabled: bool) -> None:
    global _enabled
    _enabled = bool(enabled)


def pdl_enabled() -> bool:
    return _enabled


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    """Triton has the griddepcontrol helpers and the launch option, and the device is sm_90 or later."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and torch.cuda.get_device_capability(device_index)[0] >= 9


def active(device_index: int) -> bool:
    """Whether launches on this CUDA device use PDL now."""
    return _enabled and _supported(device_index)


def options(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel with a `PDL` constexpr, for tensors on t's device: PDL on where it is
    enabled and the device and Triton support it (never in the interpreter, on CPU tensors)."""
    if t.is_cuda and active(t.get_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def pdl_start(PDL: tl.constexpr):
    """First statement of every kernel: with PDL, wait for the previous kernel, then release the next one."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
