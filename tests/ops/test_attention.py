"""Paged attention: the Triton kernels against paged_attention_torch.

CPU tier: the kernels run in Triton's interpreter on small shapes. GPU tier (-m gpu): bf16 at Llama shapes,
contexts up to 4096, and CUDA-graph replay of the decode path. `python tests/ops/test_attention.py` prints
a decode timing table against the KV bytes read (GPU).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported, by punica.ops

from punica.ops import attention  # noqa: E402
from punica.ops.attention import AttentionMeta, paged_attention_torch  # noqa: E402
from punica.testing import assert_close  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BOUNDARY_KV_LENS = [1, 15, 16, 17, 31, 32, 33]  # around the edges of 16-token pages


@pytest.fixture(scope="module")
def device():
    """Where the small-shape kernel tests run: CUDA when present, else Triton's interpreter on the CPU."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(attention._decode_kernel, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: tests/conftest.py should set it "
                    "when CUDA is absent, before anything imports punica")
    return "cpu"


def make_case(q_lens, kv_lens, h_q, h_kv, d, block_size=16, dtype=torch.float32, device="cpu", seed=0):
    """Random q [T, Hq, D] and K/V caches whose sequences own shuffled, non-adjacent blocks."""
    gen = torch.Generator().manual_seed(seed)
    n_blocks = [-(-kv // block_size) for kv in kv_lens]
    perm = torch.randperm(sum(n_blocks) + 3, generator=gen)
    tables = torch.zeros(len(kv_lens), max(n_blocks + [1]), dtype=torch.int32)
    used = 0
    for b, n in enumerate(n_blocks):
        tables[b, :n] = perm[used:used + n]
        used += n
    cache_shape = (len(perm), block_size, h_kv, d)
    k_cache, v_cache = (torch.randn(cache_shape, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(sum(q_lens), h_q, d, generator=gen).to(dtype)
    cu_q = [0]
    for n in q_lens:
        cu_q.append(cu_q[-1] + n)
    meta = AttentionMeta(cu_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
                         kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
                         block_tables=tables.to(device), max_q_len=max(q_lens, default=0),
                         max_kv_len=max(kv_lens, default=0), host_cu_q=cu_q, host_kv_lens=list(kv_lens))
    return q.to(device), k_cache.to(device), v_cache.to(device), meta


def check(fn, q_lens, kv_lens, h_q, h_kv, d, block_size=16, dtype=torch.float32, device="cpu", **kw):
    q, k_cache, v_cache, meta = make_case(q_lens, kv_lens, h_q, h_kv, d, block_size, dtype, device)
    scale = 1 / math.sqrt(d)
    out = fn(q, k_cache, v_cache, meta, scale, **kw)
    assert torch.isfinite(out).all()
    assert_close(out, paged_attention_torch(q, k_cache, v_cache, meta, scale))


# ---- small shapes (CPU: interpreter; with CUDA: compiled)

@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype,splits", [(torch.float32, 1), (torch.float16, 3)])
def test_decode_page_boundaries(device, group, dtype, splits):
    kv_lens = BOUNDARY_KV_LENS
    check(attention.decode_attention_triton, [1] * len(kv_lens), kv_lens, 2 * group, 2, 32, dtype=dtype,
          device=device, num_splits=splits)


@pytest.mark.parametrize("group", [1, 4])
def test_decode_default_splits_long_context(device, group):
    check(attention.paged_attention_triton, [1] * 3, [600, 257, 1000], group, 1, 16, device=device)


def test_decode_padding_rows_are_zero(device):
    q, k_cache, v_cache, meta = make_case([1, 1, 1, 1, 1], [17, 0, 40, 0, 1], 4, 2, 16, device=device)
    out = attention.decode_attention_triton(q, k_cache, v_cache, meta, 0.25, num_splits=2)
    assert torch.equal(out[[1, 3]], torch.zeros_like(out[[1, 3]]))
    assert_close(out, paged_attention_torch(q, k_cache, v_cache, meta, 0.25))


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_page_boundaries(device, group, dtype):
    kv_lens = [1, 15, 16, 17, 33]
    check(attention.paged_attention_triton, kv_lens, kv_lens, 2 * group, 2, 16, dtype=dtype, device=device)


@pytest.mark.parametrize("group", [1, 4])
def test_mixed_chunks_with_prefix_and_decodes(device, group):
    # chunk over a cached prefix, decodes, a fresh prompt, a sequence with no query, a 2-token chunk
    q_lens, kv_lens = [5, 1, 17, 0, 1, 2, 20], [37, 16, 17, 10, 33, 31, 90]
    check(attention.paged_attention_triton, q_lens, kv_lens, 2 * group, 2, 32, dtype=torch.float16,
          device=device)


@pytest.mark.parametrize("block_size", [8, 32, 64])
def test_block_sizes(device, block_size):
    q_lens, kv_lens = [3, 1, 40], [70, 9, 40]
    check(attention.paged_attention_triton, q_lens, kv_lens, 4, 2, 16, block_size, device=device)
    check(attention.paged_attention_triton, [1, 1, 1], kv_lens, 4, 2, 16, block_size, device=device)


def test_long_chunk_many_query_tiles(device):
    check(attention.paged_attention_triton, [70, 1], [100, 5], 2, 1, 64, dtype=torch.float16,
          device=device)


def test_strided_q_view(device):
    q, k_cache, v_cache, meta = make_case([2, 1], [20, 3], 4, 2, 16, device=device)
    qkv = torch.cat([q.flatten(1), torch.randn(q.shape[0], 64, device=device)], dim=1)
    q_view = qkv[:, :64].view(-1, 4, 16)
    out = attention.paged_attention_triton(q_view, k_cache, v_cache, meta, 0.25)
    assert_close(out, paged_attention_torch(q, k_cache, v_cache, meta, 0.25))


def test_rejects_bad_shapes(device):
    q, k_cache, v_cache, meta = make_case([1], [4], 3, 2, 16, device=device)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.25)
    with pytest.raises(ValueError, match="dtype"):
        attention.paged_attention_triton(q[:, :2].half(), k_cache, v_cache, meta, 0.25)


# ---- GPU tier

LLAMA_SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}


def random_lens(n, low, high, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=gen).tolist()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("model", list(LLAMA_SHAPES))
@pytest.mark.parametrize("batch,max_ctx", [(32, 512), (7, 4096), (1, 4096)])
def test_gpu_decode_bf16(model, batch, max_ctx):
    h_q, h_kv, d = LLAMA_SHAPES[model]
    kv_lens = random_lens(batch, 1, max_ctx, seed=batch)
    kv_lens[0] = max_ctx
    check(attention.paged_attention_triton, [1] * batch, kv_lens, h_q, h_kv, d, dtype=torch.bfloat16,
          device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("model", list(LLAMA_SHAPES))
def test_gpu_mixed_prefill_bf16(model):
    h_q, h_kv, d = LLAMA_SHAPES[model]
    q_lens, kv_lens = [512, 1, 300, 1, 1000, 77], [4096, 2048, 300, 1, 1000, 3000]
    check(attention.paged_attention_triton, q_lens, kv_lens, h_q, h_kv, d, dtype=torch.bfloat16,
          device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("q_len", [1, 40])
def test_gpu_other_dtypes_and_shapes(dtype, q_len):
    for h_q, h_kv, d, block in [(8, 2, 64, 16), (4, 4, 32, 8), (8, 1, 16, 64)]:
        check(attention.paged_attention_triton, [q_len] * 3, [q_len + 5, 700, 1500], h_q, h_kv, d, block,
              dtype=dtype, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("model", list(LLAMA_SHAPES))
def test_gpu_decode_cuda_graph_replay_equals_eager(model):
    h_q, h_kv, d = LLAMA_SHAPES[model]
    capacity = 4096
    kv_lens = random_lens(8, 1, capacity, seed=1) + [0, 0]  # two padding sequences
    q, k_cache, v_cache, meta = make_case([1] * 10, kv_lens, h_q, h_kv, d, dtype=torch.bfloat16,
                                          device="cuda")
    meta.max_kv_len = capacity  # the graph's grid is sized for the capacity, not this step
    static_kv = meta.kv_lens.clone()
    meta.kv_lens = static_kv
    attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.1)
    for seed in (2, 3):  # new context lengths for the same batch, written into the static buffer
        new_lens = [min(n, capacity) for n in random_lens(8, 1, capacity, seed)] + [0, 0]
        static_kv.copy_(torch.tensor(new_lens, dtype=torch.int32))
        meta.host_kv_lens = new_lens
        graph.replay()
        eager = attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.1)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        assert_close(out, paged_attention_torch(q, k_cache, v_cache, meta, 0.1))
        assert torch.equal(out[8:], torch.zeros_like(out[8:]))


# ---- timing (python tests/ops/test_attention.py, on a GPU)

def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_ms(lambda: dst.copy_(src)) * 1e-3)


def time_ms(fn, iters: int = 50) -> float:
    """Median milliseconds of fn over iters launches timed by CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def decode_timing_row(model: str, ctx: int, batch: int, bandwidth: float) -> str:
    h_q, h_kv, d = LLAMA_SHAPES[model]
    q, k_cache, v_cache, meta = make_case([1] * batch, [ctx] * batch, h_q, h_kv, d, dtype=torch.bfloat16,
                                          device="cuda")
    kv_bytes = 2 * batch * ctx * h_kv * d * q.element_size()
    floor_us = kv_bytes / bandwidth * 1e6
    splits = attention.decode_splits(batch, h_kv, ctx, q.device)
    ours = time_ms(lambda: attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.1)) * 1e3
    ref = time_ms(lambda: paged_attention_torch(q, k_cache, v_cache, meta, 0.1), iters=5) * 1e3
    return (f"| {model} | {ctx} | {splits} | {ours:.1f} | {ref:.0f} | {kv_bytes / 1e6:.1f} | {floor_us:.1f} "
            f"| {ours / floor_us:.2f} |")


def decode_timing_table(batch: int = 32) -> str:
    """Markdown: decode time vs the time to read its K/V at the measured copy bandwidth."""
    bandwidth = copy_bandwidth()
    lines = [f"GPU: {torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
             f"batch {batch}; bf16", "",
             "| model | context | splits | triton us | torch us | KV MB | KV floor us | triton / floor |",
             "|---|---|---|---|---|---|---|---|"]
    for model in LLAMA_SHAPES:
        lines += [decode_timing_row(model, ctx, batch, bandwidth) for ctx in (512, 2048)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(decode_timing_table())
