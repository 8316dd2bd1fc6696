"""RMSNorm, residual-add RMSNorm, SiLU-mul and RoPE: the Triton kernels against the torch references.

CPU: Triton's interpreter; with CUDA: compiled, plus bf16 at Llama-2-7B sizes (-m gpu).
"""

from __future__ import annotations

import pytest
import torch

from punica.ops import kv_store, norm_rope
from punica.ops.kv_store import rope_store_kv_torch
from punica.ops.norm_rope import (
    add_rms_norm_torch,
    apply_rope_torch,
    rms_norm_torch,
    rope_cos_sin,
    rope_inv_freq,
    silu_and_mul_torch,
)
from punica.testing import assert_close

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h", [(5, 64), (3, 96), (1, 1000)])
def test_rms_norm(device, dtype, t, h):
    x, w = randn(t, h, dtype=dtype, device=device), randn(h, dtype=dtype, device=device, seed=1)
    assert_close(norm_rope.rms_norm_triton(x, w, 1e-6), rms_norm_torch(x, w, 1e-6))
    w32 = w.float()  # a weight kept in fp32: the reference multiplies before rounding
    assert_close(norm_rope.rms_norm_triton(x, w32, 1e-5), rms_norm_torch(x, w32, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(device, dtype):
    x, res = randn(7, 80, dtype=dtype, device=device), randn(7, 80, dtype=dtype, device=device, seed=2)
    w = randn(80, dtype=dtype, device=device, seed=1)
    out, new_res = norm_rope.add_rms_norm_triton(x, res, w, 1e-6)
    ref_out, ref_res = add_rms_norm_torch(x, res, w, 1e-6)
    if dtype == torch.bfloat16 and device == "cpu":  # the interpreter truncates to bf16 instead of rounding
        assert_close(new_res, ref_res)
    else:
        assert torch.equal(new_res, ref_res)
    assert_close(out, ref_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(5, 96), (2, 1500)])
def test_silu_and_mul(device, dtype, t, inter):
    x = randn(t, 2 * inter, dtype=dtype, device=device)
    assert_close(norm_rope.silu_and_mul_triton(x), silu_and_mul_torch(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_q,h_kv,d", [(4, 2, 16), (6, 3, 32), (2, 2, 24)])
def test_apply_rope_on_fused_qkv_views(device, dtype, h_q, h_kv, d):
    t = 5
    qkv = randn(t, (h_q + 2 * h_kv) * d, dtype=dtype, device=device)
    q = qkv[:, :h_q * d].view(t, h_q, d)
    k = qkv[:, h_q * d:(h_q + h_kv) * d].view(t, h_kv, d)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cos_sin = rope_cos_sin(rope_inv_freq(d, 10000.0, scaling), 512).to(device)
    positions = torch.tensor([0, 1, 17, 300, 511], device=device)
    for ours, ref in zip(norm_rope.apply_rope_triton(q, k, positions, cos_sin),
                         apply_rope_torch(q, k, positions, cos_sin)):
        assert ours.is_contiguous()
        assert_close(ours, ref)


def rope_store_case(t, h_q, h_kv, d, dtype, device, max_pos=512):
    """Fused-qkv views q, k, v, positions, cos_sin, slots (two of them padding) and a random KV pool."""
    qkv = randn(t, (h_q + 2 * h_kv) * d, dtype=dtype, device=device)
    q, k, v = (qkv[:, a * d:b * d].view(t, -1, d) for a, b in ((0, h_q), (h_q, h_q + h_kv),
                                                                (h_q + h_kv, h_q + 2 * h_kv)))
    cos_sin = rope_cos_sin(rope_inv_freq(d, 10000.0, None), max_pos).to(device)
    gen = torch.Generator().manual_seed(4)
    positions = torch.randint(0, max_pos, (t,), generator=gen).to(device)
    blocks, block = 2 * t, 16
    slots = torch.randperm(blocks * block, generator=gen)[:t]
    slots[1] = slots[-1] = -1
    pool = randn(2, blocks, block, h_kv, d, dtype=dtype, device=device, seed=2)
    return q, k, v, positions, cos_sin, slots.to(device), pool


def qk_norm_case(d, dtype, device, weight_dtype=None):
    """Qwen3's per-head q/k norm weights (around 1, q's and k's apart) and eps."""
    wq = 1 + 0.5 * randn(d, dtype=weight_dtype or dtype, device=device, seed=11)
    wk = 1 + 0.5 * randn(d, dtype=weight_dtype or dtype, device=device, seed=12)
    return wq, wk, 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_q,h_kv,d", [(4, 2, 16), (6, 3, 32), (8, 8, 64)])
@pytest.mark.parametrize("with_delta,with_norm", [(False, False), (True, False), (False, True), (True, True)])
def test_rope_store_kv_equals_rope_then_store(device, dtype, h_q, h_kv, d, with_delta, with_norm):
    """One launch: q rotated, k rotated into the pool and v beside it, padding rows (slot -1) untouched; with
    a LoRA delta (views of a fused [T, N] tensor, like q, k, v) added to each first; with q/k norms, each head
    of q and k RMS-normalized before the rotation."""
    q, k, v, positions, cos_sin, slots, pool = rope_store_case(6, h_q, h_kv, d, dtype, device)
    delta = None
    if with_delta:
        fused = randn(6, (h_q + 2 * h_kv) * d, dtype=dtype, device=device, seed=9)
        delta = tuple(fused.as_strided(x.shape, x.stride(), x.storage_offset()) for x in (q, k, v))
    norms = qk_norm_case(d, dtype, device) if with_norm else None
    ours, ref = pool.clone(), pool.clone()
    q_ours = kv_store.rope_store_kv_triton(q, k, v, positions, cos_sin, ours[0], ours[1], slots, delta, norms)
    q_ref = rope_store_kv_torch(q, k, v, positions, cos_sin, ref[0], ref[1], slots, delta, norms)
    plain = pool.clone()
    if with_delta:  # the delta took part
        assert not torch.equal(q_ref, rope_store_kv_torch(q, k, v, positions, cos_sin, plain[0], plain[1], slots,
                                                          None, norms))
    if with_norm:  # so did the norms, and they equal rms_norm on each head before the rotation
        assert not torch.equal(q_ref, rope_store_kv_torch(q, k, v, positions, cos_sin, plain[0], plain[1], slots,
                                                          delta))
        qd, kd, vd = (x if delta is None else x + dx for x, dx in zip((q, k, v), delta or (None,) * 3))
        normed = [norm_rope.rms_norm_torch(x.reshape(-1, d), w, norms[2]).view(x.shape)
                  for x, w in ((qd, norms[0]), (kd, norms[1]))]
        assert torch.equal(q_ref, rope_store_kv_torch(*normed, vd, positions, cos_sin, plain[0], plain[1], slots))
    assert_close(q_ours, q_ref)
    assert_close(ours, ref)
    changed = ours.ne(pool).view(2, -1, k.shape[1] * k.shape[2]).any(-1)  # [k/v, pool row]
    real = slots[slots >= 0].sort().values
    for rows in changed:  # exactly the rows of real tokens, in both pools
        assert torch.equal(rows.nonzero().flatten(), real)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_adds_a_delta_first(device, dtype):
    x, res, delta = (randn(5, 96, dtype=dtype, device=device, seed=s) for s in (1, 2, 3))
    w = randn(96, dtype=dtype, device=device, seed=4)
    ours = norm_rope.add_rms_norm_triton(x, res, w, 1e-6, delta)
    for got, ref, plain in zip(ours, add_rms_norm_torch(x, res, w, 1e-6, delta),
                               add_rms_norm_torch(x + delta, res, w, 1e-6)):
        assert_close(got, ref)
        assert_close(got, plain)
    assert not torch.allclose(ours[1], add_rms_norm_torch(x, res, w, 1e-6)[1])  # the delta took part
    with pytest.raises(ValueError, match="delta"):
        norm_rope.add_rms_norm_triton(x, res, w, 1e-6, delta[:, :48])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_adds_a_delta_first(device, dtype):
    x, delta = randn(5, 96, dtype=dtype, device=device), randn(5, 96, dtype=dtype, device=device, seed=7)
    ours = norm_rope.silu_and_mul_triton(x, delta)
    assert_close(ours, silu_and_mul_torch(x, delta))
    assert_close(ours, silu_and_mul_torch(x + delta))
    with pytest.raises(ValueError, match="delta"):
        norm_rope.silu_and_mul_triton(x, delta[:, :48])


def test_rope_store_kv_norm_weights_of_another_dtype(device):
    """q/k norm weights in fp32 beside fp16 activations: the product is taken in fp32, as the reference takes it."""
    q, k, v, positions, cos_sin, slots, pool = rope_store_case(5, 4, 2, 32, torch.float16, device)
    norms = qk_norm_case(32, torch.float16, device, weight_dtype=torch.float32)
    ours, ref = pool.clone(), pool.clone()
    assert_close(kv_store.rope_store_kv_triton(q, k, v, positions, cos_sin, ours[0], ours[1], slots, None, norms),
                 rope_store_kv_torch(q, k, v, positions, cos_sin, ref[0], ref[1], slots, None, norms))
    assert_close(ours, ref)
    with pytest.raises(ValueError, match="qk_norm weights must be contiguous \\[32\\]"):
        kv_store.rope_store_kv_triton(q, k, v, positions, cos_sin, ours[0], ours[1], slots, None,
                                      (norms[0][:16], norms[1], 1e-6))


def test_rejects_bad_shapes(device):
    with pytest.raises(ValueError, match="weight"):
        norm_rope.rms_norm_triton(randn(2, 8, device=device), randn(4, device=device), 1e-6)
    with pytest.raises(ValueError, match="2I"):
        norm_rope.silu_and_mul_triton(randn(2, 7, device=device))


@pytest.mark.gpu
@gpu
def test_gpu_llama2_7b_sizes_bf16():
    t, hidden, inter = 32, 4096, 11008
    x, res = randn(t, hidden, dtype=torch.bfloat16, device="cuda"), randn(t, hidden, dtype=torch.bfloat16,
                                                                           device="cuda", seed=3)
    w = randn(hidden, dtype=torch.bfloat16, device="cuda", seed=1)
    assert_close(norm_rope.rms_norm_triton(x, w, 1e-5), rms_norm_torch(x, w, 1e-5))
    for ours, ref in zip(norm_rope.add_rms_norm_triton(x, res, w, 1e-5), add_rms_norm_torch(x, res, w, 1e-5)):
        assert_close(ours, ref)
    gate_up = randn(t, 2 * inter, dtype=torch.bfloat16, device="cuda")
    assert_close(norm_rope.silu_and_mul_triton(gate_up), silu_and_mul_torch(gate_up))
    qkv = randn(t, 3 * hidden, dtype=torch.bfloat16, device="cuda")
    q, k = qkv[:, :hidden].view(t, 32, 128), qkv[:, hidden:2 * hidden].view(t, 32, 128)
    cos_sin = rope_cos_sin(rope_inv_freq(128, 10000.0, None), 4096).cuda()
    positions = torch.randint(0, 4096, (t,), device="cuda")
    for ours, ref in zip(norm_rope.apply_rope_triton(q, k, positions, cos_sin),
                         apply_rope_torch(q, k, positions, cos_sin)):
        assert_close(ours, ref)
    q, k, v, positions, cos_sin, slots, pool = rope_store_case(t, 32, 8, 128, torch.bfloat16, "cuda", 4096)
    for norms in (None, qk_norm_case(128, torch.bfloat16, "cuda")):  # Llama 3 8B's and Qwen3 8B's attention
        ours, ref = pool.clone(), pool.clone()
        assert_close(kv_store.rope_store_kv_triton(q, k, v, positions, cos_sin, ours[0], ours[1], slots, None, norms),
                     rope_store_kv_torch(q, k, v, positions, cos_sin, ref[0], ref[1], slots, None, norms))
        assert_close(ours, ref)
        ours, ref = (pool.to(torch.float8_e4m3fn) for _ in range(2))  # kv_cache_dtype "fp8"
        assert_close(kv_store.rope_store_kv_triton(q, k, v, positions, cos_sin, ours[0], ours[1], slots, None, norms),
                     rope_store_kv_torch(q, k, v, positions, cos_sin, ref[0], ref[1], slots, None, norms))
        # the rotations' bf16 roundings may differ in the last place, so a rare entry lands one e4m3 step away
        diff, step = (ours.float() - ref.float()).abs(), ref.float().abs() / 8 + 2.0 ** -9
        assert (diff <= step).all() and (diff > 0).float().mean() < 1e-3
