"""LoRA deltas added inside the next op (ops/lora_epilogue.py): add_rms_norm and silu_and_mul with a
LoRADelta, Triton against the torch reference (which runs the SGMV expand, then the op).

CPU: Triton's interpreter in fp32/fp16; GPU (-m gpu): bf16 at Llama-2-7B widths against fp32.
"""

from __future__ import annotations

import pytest
import torch

from punica.ops import norm_rope
from punica.ops.lora_epilogue import LoRADelta
from punica.ops.norm_rope import add_rms_norm_torch, silu_and_mul_torch
from punica.testing import assert_close
from tests.ops.test_sgmv import gpu_plan, make_weights, needs_cuda, offsets, workload_plan

RANKS = (16, 5, 8, 3)


def deltas(plan, widths, R, dtype, device, seed=0):
    """(delta as the kernels may see it, the same delta for the reference, y, residual): the kernels' v holds
    NaN where they must not read (rows of slot-0 tokens, columns past the token's rank); the reference's
    v has zeros there."""
    T, n = plan.host_indptr[-1], len(widths)
    _, lora_b, slot_rank = make_weights(10, 8, widths, R, tuple(min(r, R) for r in RANKS), dtype, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    v = torch.randn(T, n * R, generator=gen, device=device)
    rank = slot_rank[plan.token_slot.long()]
    unread = (torch.arange(R, device=device)[None, :] >= rank[:, None]).repeat(1, n)
    clean = v.masked_fill(unread, 0.0)
    y = torch.randn(T, sum(widths), generator=gen, device=device).to(dtype)
    residual = torch.randn(T, sum(widths), generator=gen, device=device).to(dtype)
    make = lambda v: LoRADelta(v, lora_b, slot_rank, plan, offsets(widths))  # noqa: E731
    return make(v.masked_fill(unread, float("nan"))), make(clean), y, residual


PLANS = {"decode": dict(prefill=False, num_seqs=13), "prefill": dict(prefill=True, num_seqs=6)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("h", [96, 1100])
def test_add_rms_norm_with_delta(device, dtype, kind, h):
    plan = workload_plan("uniform", num_adapters=9, device=device, **PLANS[kind])
    delta, clean, x, residual = deltas(plan, (h,), 16, dtype, device)
    w = torch.randn(h, device=device).to(dtype)
    out, new_res = norm_rope.add_rms_norm_triton(x, residual, w, 1e-6, delta)
    ref_out, ref_res = add_rms_norm_torch(x, residual, w, 1e-6, clean)
    assert not new_res.isnan().any()
    assert_close(new_res, ref_res)
    assert_close(out, ref_out)
    plain, _ = add_rms_norm_torch(x, residual, w, 1e-6)
    assert not torch.allclose(out.float(), plain.float(), atol=1e-2), "the delta was not added"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("inter", [64, 300])
def test_silu_and_mul_with_delta(device, dtype, kind, inter):
    plan = workload_plan("zipf:1.5", num_adapters=9, device=device, seed=1, **PLANS[kind])
    delta, clean, x, _ = deltas(plan, (inter, inter), 8, dtype, device, seed=2)
    out = norm_rope.silu_and_mul_triton(x, delta)
    assert not out.isnan().any()
    assert_close(out, silu_and_mul_torch(x, clean))
    assert not torch.allclose(out.float(), silu_and_mul_torch(x).float(), atol=1e-2), "the delta was not added"


def test_delta_shape_errors(device):
    plan = workload_plan("distinct", 4, 9, False, device)
    delta, _, x, residual = deltas(plan, (32, 32), 16, torch.float32, device)
    with pytest.raises(ValueError, match="one output slice"):
        norm_rope.add_rms_norm_triton(x, residual, torch.ones(64, device=device), 1e-6, delta)
    with pytest.raises(ValueError, match="slices"):
        norm_rope.silu_and_mul_triton(torch.zeros(4, 128, device=device), delta)


# ---- GPU tier -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 32, 255])
@pytest.mark.parametrize("popularity", ["distinct", "uniform", "identical"])
def test_gpu_bf16_epilogues_match_fp32(popularity, T):
    plan = gpu_plan(popularity, T)
    for widths, R in (((4096,), 16), ((11008, 11008), 64)):
        delta, clean, x, residual = deltas(plan, widths, R, torch.bfloat16, "cuda")
        x32 = x.float()
        clean32 = LoRADelta(clean.v, clean.lora_b.float(), clean.slot_rank, plan, clean.slice_offsets)
        if len(widths) == 1:
            w = torch.randn(widths[0], device="cuda").bfloat16()
            out, res = norm_rope.add_rms_norm_triton(x, residual, w, 1e-6, delta)
            ref_out, ref_res = add_rms_norm_torch(x32, residual.float(), w.float(), 1e-6, clean32)
            assert_close(res.float(), ref_res, dtype=torch.bfloat16)
            assert_close(out.float(), ref_out, dtype=torch.bfloat16)
        else:
            out = norm_rope.silu_and_mul_triton(x, delta)
            assert_close(out.float(), silu_and_mul_torch(x32, clean32), dtype=torch.bfloat16)
