"""Helpers shared by the test suite and the benchmarks' self-checks (kept in the package so there is
exactly one tolerance rule)."""

from __future__ import annotations

import torch

# Relative-norm tolerance by the dtype of the tensor under test.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / max(||expected||, tiny), computed in fp64."""
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 factor: float = 1.0) -> None:
    """Assert relative-norm closeness at the tolerance of `dtype` (default: actual's dtype) times factor."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    tol = REL_TOL[dtype or actual.dtype] * factor
    err = rel_error(actual, expected)
    if not err <= tol:
        raise AssertionError(f"relative error {err:.3e} exceeds {tol:.1e} ({dtype or actual.dtype})")
