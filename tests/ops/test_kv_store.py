"""store_kv: the Triton kernel against store_kv_torch (CPU: Triton's interpreter; with CUDA: compiled)."""

from __future__ import annotations

import pytest
import torch

from punica.ops import kv_store
from punica.ops.kv_store import store_kv_torch


def run_both(k, v, cache_shape, slots, cache_dtype):
    """The caches after store_kv_triton and after store_kv_torch, from the same random start."""
    gen = torch.Generator().manual_seed(1)
    start = torch.randn((2, *cache_shape), generator=gen).to(device=k.device, dtype=cache_dtype)
    ours, ref = start.clone(), start.clone()
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=k.device)
    kv_store.store_kv_triton(k, v, ours[0], ours[1], slot_mapping)
    store_kv_torch(k, v, ref[0], ref[1], slot_mapping)
    return ours, ref


@pytest.mark.parametrize("h_kv,d,block_size", [(2, 16, 16), (3, 32, 8), (8, 128, 64), (1, 64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv_matches_reference(device, h_kv, d, block_size, dtype):
    gen = torch.Generator().manual_seed(0)
    num_blocks = 5
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:7].tolist()
    slots[2] = slots[5] = -1  # padding tokens
    k, v = (torch.randn(7, h_kv, d, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    ours, ref = run_both(k, v, (num_blocks, block_size, h_kv, d), slots, dtype)
    assert torch.equal(ours, ref)


def test_store_kv_strided_views_and_cast(device):
    """k, v as slices of a fused qkv output (the model's layout), cast into an fp16 cache."""
    qkv = torch.randn(5, 4 * 16 + 2 * 2 * 16, device=device)
    k = qkv[:, 64:96].view(5, 2, 16)
    v = qkv[:, 96:].view(5, 2, 16)
    ours, ref = run_both(k, v, (4, 8, 2, 16), [3, -1, 31, 0, 17], torch.float16)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_into_fp8_cache(device, dtype):
    """kv_cache_dtype "fp8": values converted to float8 e4m3 on the way in. Under Triton's interpreter its
    conversion mis-rounds values whose mantissa carries into the exponent (7.8 -> 4.0), so the CPU tier stores
    values that e4m3 holds exactly; the GPU tier rounds arbitrary ones (test_gpu_fp8_rounds_as_torch)."""
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(6, 2, 32, generator=gen).mul(20).to(torch.float8_e4m3fn).to(dtype=dtype, device=device)
            for _ in range(2))
    ours, ref = run_both(k, v, (3, 8, 2, 32), [3, -1, 23, 0, 17, 9], torch.float8_e4m3fn)
    assert ours.dtype == torch.float8_e4m3fn and torch.equal(ours.float(), ref.float())
    assert torch.equal(ref[0].view(-1, 2, 32)[3].float(), k[0].float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_fp8_rounds_as_torch(dtype):
    """Arbitrary values, some beyond e4m3's +-448 (which saturate), rounded into the fp8 cache as torch rounds."""
    gen = torch.Generator().manual_seed(4)
    k, v = (torch.randn(64, 8, 128, generator=gen).mul(150).to(dtype=dtype, device="cuda") for _ in range(2))
    assert k.abs().max() > 448
    slots = torch.randperm(4 * 16, generator=gen)[:64].tolist()
    ours, ref = run_both(k, v, (4, 16, 8, 128), slots, torch.float8_e4m3fn)
    ours, ref = ours.float(), ref.float()
    wrong = ours != ref
    assert not wrong.any(), (f"{int(wrong.sum())} of {wrong.numel()} differ ({int(ours.isnan().sum())} NaN in ours, "
                             f"{int(ref.isnan().sum())} in the reference): {ours[wrong][:8].tolist()} vs "
                             f"{ref[wrong][:8].tolist()}")
    assert ref.abs().max() == 448


def test_store_kv_empty_and_all_padding(device):
    k = torch.randn(3, 2, 16, device=device)
    ours, ref = run_both(k, k, (2, 16, 2, 16), [-1, -1, -1], torch.float32)
    assert torch.equal(ours, ref)
    ours, ref = run_both(k[:0], k[:0], (2, 16, 2, 16), [], torch.float32)
    assert torch.equal(ours, ref)


def test_store_kv_rejects_bad_shapes(device):
    k = torch.randn(3, 2, 16, device=device)
    cache = torch.zeros(2, 16, 4, 16, device=device)
    with pytest.raises(ValueError, match="must be"):
        kv_store.store_kv_triton(k, k, cache, cache, torch.zeros(3, dtype=torch.int64, device=device))


def test_triton_op_table_uses_every_triton_kernel():
    """select_ops("triton") picks each op's Triton kernel wherever it is defined, even when another ops
    module imports the op's torch reference (kv_store imports apply_rope_torch)."""
    from punica import ops

    table = ops.select_ops("triton")
    modules = (ops.gemm, ops.sgmv, ops.attention, ops.kv_store, ops.norm_rope)
    for name in (f for f in ops.Ops.__dataclass_fields__ if f != "backend"):
        kernels = [getattr(m, f"{name}_triton") for m in modules if hasattr(m, f"{name}_triton")]
        if kernels:
            assert getattr(table, name) is kernels[0], name
    assert table.apply_rope is ops.norm_rope.apply_rope_triton
    assert ops.select_ops("torch").apply_rope is ops.norm_rope.apply_rope_torch
