"""Shared by the kernel tests: where the small-shape tests run."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def device():
    """CUDA when present, else Triton's interpreter on CPU tensors (tests/conftest.py turns it on)."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: tests/conftest.py should set it before punica.ops loads")
    return "cpu"
