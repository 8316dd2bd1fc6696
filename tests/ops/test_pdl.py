"""Programmatic dependent launch switch (ops/pdl.py); its kernels' sm_90 code is compiled by
test_compile_sm90.py and its results checked bitwise on the GPU (test_gpu_engine.py)."""

from __future__ import annotations

import torch

from punica.ops import pdl


def test_pdl_is_on_by_default_and_never_on_cpu_tensors():
    assert pdl.pdl_enabled()
    assert pdl.options(torch.zeros(2)) == {"PDL": False}  # the interpreter has no griddepcontrol
    pdl.set_pdl(False)
    try:
        assert not pdl.pdl_enabled()
        assert pdl.options(torch.zeros(2)) == {"PDL": False}
    finally:
        pdl.set_pdl(True)
