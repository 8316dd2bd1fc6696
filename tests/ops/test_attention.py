"""Paged attention: the Triton kernels against paged_attention_torch.

CPU tier: the kernels run in Triton's interpreter on small shapes. GPU tier (-m gpu): bf16 at Llama shapes,
contexts up to 4096, and CUDA-graph replay of the decode path. `python tests/ops/test_attention.py` prints
a decode timing table against the KV bytes read (GPU).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import pytest
import torch

from punica.ops import attention
from punica.ops.attention import AttentionMeta, paged_attention_torch
from punica.testing import assert_close

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BOUNDARY_KV_LENS = [1, 15, 16, 17, 31, 32, 33]  # around the edges of 16-token pages


def make_case(q_lens, kv_lens, h_q, h_kv, d, block_size=16, dtype=torch.float32, device="cpu", seed=0,
              kv_dtype=None):
    """Random q [T, Hq, D] and K/V caches (of `kv_dtype`, q's by default) whose sequences own shuffled,
    non-adjacent blocks."""
    gen = torch.Generator().manual_seed(seed)
    n_blocks = [-(-kv // block_size) for kv in kv_lens]
    perm = torch.randperm(sum(n_blocks) + 3, generator=gen)
    gen = torch.Generator(device).manual_seed(seed)
    tables = torch.zeros(len(kv_lens), max(n_blocks + [1]), dtype=torch.int32)
    used = 0
    for b, n in enumerate(n_blocks):
        tables[b, :n] = perm[used:used + n]
        used += n
    cache_shape = (len(perm), block_size, h_kv, d)
    k_cache, v_cache = (torch.randn(cache_shape, generator=gen, device=device).to(kv_dtype or dtype)
                        for _ in range(2))
    q = torch.randn(sum(q_lens), h_q, d, generator=gen, device=device).to(dtype)
    cu_q = [0]
    for n in q_lens:
        cu_q.append(cu_q[-1] + n)
    meta = AttentionMeta(cu_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
                         kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
                         block_tables=tables.to(device), max_q_len=max(q_lens, default=0),
                         max_kv_len=max(kv_lens, default=0), host_cu_q=cu_q, host_kv_lens=list(kv_lens))
    return q, k_cache, v_cache, meta


def check(fn, q_lens, kv_lens, h_q, h_kv, d, block_size=16, dtype=torch.float32, device="cpu", kv_dtype=None, **kw):
    q, k_cache, v_cache, meta = make_case(q_lens, kv_lens, h_q, h_kv, d, block_size, dtype, device, kv_dtype=kv_dtype)
    scale = 1 / math.sqrt(d)
    out = fn(q, k_cache, v_cache, meta, scale, **kw)
    assert torch.isfinite(out).all()
    assert_close(out, paged_attention_torch(q, k_cache, v_cache, meta, scale))


# ---- small shapes (CPU: interpreter; with CUDA: compiled)

@pytest.fixture(params=["never", "always"])
def kv_as_a(request, monkeypatch):
    """The decode kernel's dots in either orientation (attention.DECODE_KV_AS_A)."""
    monkeypatch.setattr(attention, "DECODE_KV_AS_A", request.param)
    return request.param


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype,splits", [(torch.float32, 1), (torch.float16, 3)])
def test_decode_page_boundaries(device, group, dtype, splits, kv_as_a):
    kv_lens = BOUNDARY_KV_LENS
    check(attention.decode_attention_triton, [1] * len(kv_lens), kv_lens, 2 * group, 2, 32, dtype=dtype,
          device=device, num_splits=splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_cache(device, dtype, kv_as_a):
    """K/V in float8 e4m3 (kv_cache_dtype "fp8"), read into q's dtype: decodes (split and not), and prefill chunks
    beside decodes, against the reference reading the same cache."""
    fp8 = torch.float8_e4m3fn
    for h_q in (2, 4, 8):  # groups 1, 2 and 4
        check(attention.decode_attention_triton, [1] * 4, [1, 17, 33, 64], h_q, 2, 32, dtype=dtype, device=device,
              kv_dtype=fp8, num_splits=2)
    check(attention.paged_attention_triton, [5, 1, 20, 1], [40, 9, 20, 33], 4, 2, 32, dtype=dtype, device=device,
          kv_dtype=fp8)
    q, k_cache, v_cache, meta = make_case([1], [20], 4, 2, 32, dtype=dtype, device=device, kv_dtype=fp8)
    with pytest.raises(ValueError, match="dtype mismatch"):  # a cache of another 16-bit dtype than q's
        attention.paged_attention_triton(q, k_cache.to(torch.bfloat16), v_cache.to(torch.bfloat16), meta, 1.0)


@pytest.mark.parametrize("group", [1, 4])
def test_decode_default_splits_long_context(device, group):
    check(attention.paged_attention_triton, [1] * 3, [600, 257, 1000], group, 1, 16, device=device)


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_in_seq_order_equals_unordered(device, splits, kv_as_a):
    """With meta.seq_order (longest context first, the empty one last) the decode programs start in that
    order: the same outputs, bit for bit."""
    kv_lens = [17, 40, 0, 1, 33]
    q, k_cache, v_cache, meta = make_case([1, 1, 1, 1, 1], kv_lens, 4, 2, 16, device=device)
    plain = attention.decode_attention_triton(q, k_cache, v_cache, meta, 0.25, num_splits=splits)
    order = sorted(range(len(kv_lens)), key=lambda b: -kv_lens[b])
    meta.seq_order = torch.tensor(order, dtype=torch.int32, device=device)
    ordered = attention.decode_attention_triton(q, k_cache, v_cache, meta, 0.25, num_splits=splits)
    assert torch.equal(ordered, plain)
    assert_close(ordered, paged_attention_torch(q, k_cache, v_cache, meta, 0.25))
    meta.seq_order = meta.seq_order.long()
    with pytest.raises(ValueError, match="seq_order"):
        attention.decode_attention_triton(q, k_cache, v_cache, meta, 0.25)


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


@pytest.mark.parametrize("capacity_extra", [0, 5])
def test_prefill_work_list(device, capacity_extra):
    """q_tiles (CUDA graphs of mixed steps): one program per (sequence, query block), padding entries
    skipped, equal the reference."""
    q_lens, kv_lens = [5, 1, 40, 0, 1, 2, 20], [37, 16, 40, 10, 33, 31, 90]
    q, k_cache, v_cache, meta = make_case(q_lens, kv_lens, 4, 2, 16, dtype=torch.float16, device=device)
    rows = attention.prefill_tile_rows(16, torch.float16, meta.max_q_len)
    flat = attention.query_tiles(meta.host_cu_q, rows) + [-1, 0] * capacity_extra
    meta.q_tiles = torch.tensor(flat, dtype=torch.int32, device=device).view(-1, 2)
    meta.tile_rows = rows
    out = attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.25)
    assert_close(out, paged_attention_torch(q, k_cache, v_cache, meta, 0.25))
    assert len(flat) // 2 - capacity_extra <= -(-sum(q_lens) // rows) + len(q_lens)


MIXED_Q_LENS, MIXED_KV_LENS = [5, 1, 40, 0, 1, 2, 20], [37, 16, 40, 10, 33, 31, 90]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("tiled", [False, True])
def test_mixed_step_with_and_without_the_decode_kernel(device, monkeypatch, split, tiled):
    """SPLIT_MIXED on: one-query sequences go to the decode kernel, the rest to the prefill kernel (tiles
    leave the one-query sequences out); off: all of them through the prefill kernel. Both equal the reference."""
    monkeypatch.setattr(attention, "SPLIT_MIXED", split)
    q, k_cache, v_cache, meta = make_case(MIXED_Q_LENS, MIXED_KV_LENS, 4, 2, 16, dtype=torch.float16,
                                          device=device)
    if tiled:
        meta.tile_rows = attention.prefill_tile_rows(16, torch.float16, meta.max_q_len)
        flat = attention.query_tiles(meta.host_cu_q, meta.tile_rows) + [-1, 0] * 2
        meta.q_tiles = torch.tensor(flat, dtype=torch.int32, device=device).view(-1, 2)
        singles = [b for b, n in enumerate(MIXED_Q_LENS) if n == 1]
        assert any(b in singles for b in flat[0::2]) != split
    assert attention.splits_mixed(meta) == split
    out = attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.25)
    assert_close(out, paged_attention_torch(q, k_cache, v_cache, meta, 0.25))


@pytest.mark.parametrize("splits", [1, 2])
def test_mixed_step_kernels_keep_to_their_own_sequences(device, monkeypatch, splits):
    """The decode kernel writes only the rows of one-query sequences, the prefill kernel (split) only the
    others: each leaves the other's rows as they were."""
    q, k_cache, v_cache, meta = make_case(MIXED_Q_LENS, MIXED_KV_LENS, 4, 2, 16, device=device)
    ref = paged_attention_torch(q, k_cache, v_cache, meta, 0.25)
    single = torch.zeros(q.shape[0], dtype=torch.bool)
    for b, n in enumerate(MIXED_Q_LENS):
        single[meta.host_cu_q[b]:meta.host_cu_q[b + 1]] = n == 1
    out = torch.full_like(q, 7.0)
    attention._decode_into(out, q, k_cache, v_cache, meta, 0.25, num_splits=splits)
    assert torch.equal(out[~single], torch.full_like(out[~single], 7.0))
    assert_close(out[single], ref[single])
    monkeypatch.setattr(attention, "_decode_into", lambda out, *args, **kw: out.fill_(7.0))
    out = attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.25)
    assert torch.equal(out[single], torch.full_like(out[single], 7.0))
    assert_close(out[~single], ref[~single])


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
def test_gpu_decode_bf16(model, batch, max_ctx, kv_as_a):
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
@pytest.mark.parametrize("model", list(LLAMA_SHAPES))
def test_gpu_fp8_cache_bf16(model, kv_as_a):
    h_q, h_kv, d = LLAMA_SHAPES[model]
    kv_lens = random_lens(32, 1, 512, seed=3)
    check(attention.paged_attention_triton, [1] * 32, kv_lens, h_q, h_kv, d, dtype=torch.bfloat16, device="cuda",
          kv_dtype=torch.float8_e4m3fn)
    check(attention.paged_attention_triton, [512, 1, 300, 1, 77], [4096, 2048, 300, 1, 3000], h_q, h_kv, d,
          dtype=torch.bfloat16, device="cuda", kv_dtype=torch.float8_e4m3fn)


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
@pytest.mark.parametrize("ordered", [False, True])
def test_gpu_decode_cuda_graph_replay_equals_eager(model, ordered, kv_as_a):
    """Replays with new context lengths (and, `ordered`, the longest-first order written beside them, as the
    engine's decode graphs do) equal an eager call in grid order, bit for bit."""
    h_q, h_kv, d = LLAMA_SHAPES[model]
    capacity = 4096  # every sequence owns blocks for this many tokens; two padding sequences own none
    q, k_cache, v_cache, meta = make_case([1] * 10, [capacity] * 8 + [0, 0], h_q, h_kv, d,
                                          dtype=torch.bfloat16, device="cuda")
    static_kv = meta.kv_lens  # the graph reads this buffer; each step writes its lengths into it
    static_kv.copy_(torch.tensor(random_lens(8, 1, capacity, seed=1) + [0, 0], dtype=torch.int32))
    if ordered:
        meta.seq_order = torch.arange(10, dtype=torch.int32, device="cuda")
    attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.1)
    for seed in (2, 3):  # new context lengths for the same batch, written into the static buffer
        new_lens = random_lens(8, 1, capacity, seed) + [0, 0]
        static_kv.copy_(torch.tensor(new_lens, dtype=torch.int32))
        meta.host_kv_lens = new_lens
        if ordered:
            meta.seq_order.copy_(torch.tensor(sorted(range(10), key=lambda b: -new_lens[b]), dtype=torch.int32))
        graph.replay()
        eager = attention.paged_attention_triton(q, k_cache, v_cache, dataclasses.replace(meta, seq_order=None), 0.1)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        assert_close(out, paged_attention_torch(q, k_cache, v_cache, meta, 0.1))
        assert torch.equal(out[8:], torch.zeros_like(out[8:]))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("model", list(LLAMA_SHAPES))
def test_gpu_mixed_step_on_two_streams_equals_one_and_replays(model, monkeypatch):
    """A mixed step as its CUDA graph runs it (a 128-token chunk among 31 decodes, a padded work list): the
    prefill kernel on the side stream (OVERLAP_MIXED) gives the same bits as one stream, also when replayed
    from a graph with both streams as branches; and equals the reference."""
    h_q, h_kv, d = LLAMA_SHAPES[model]
    q_lens, kv_lens = [128] + [1] * 31, [528] + random_lens(31, 1, 800, seed=4)
    q, k_cache, v_cache, meta = make_case(q_lens, kv_lens, h_q, h_kv, d, dtype=torch.bfloat16, device="cuda")
    meta.tile_rows = attention.prefill_tile_rows(d, torch.bfloat16, 256)
    flat = attention.query_tiles(meta.host_cu_q, meta.tile_rows) + [-1, 0] * 8
    meta.q_tiles = torch.tensor(flat, dtype=torch.int32, device="cuda").view(-1, 2)
    monkeypatch.setattr(attention, "OVERLAP_MIXED", False)
    one = attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.1)
    monkeypatch.setattr(attention, "OVERLAP_MIXED", True)
    two = attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.1)
    torch.cuda.synchronize()
    assert torch.equal(one, two)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.1)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, one)
    assert_close(one, paged_attention_torch(q, k_cache, v_cache, meta, 0.1))


# ---- timing (python tests/ops/test_attention.py, on a GPU)

def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_us(lambda: dst.copy_(src), graph=False) * 1e-6)


def time_us(fn, graph: bool = True, reps: int = 20, iters: int = 10) -> float:
    """Median microseconds per call: `reps` calls replayed from one CUDA graph (no launch gaps), or eager."""
    fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        run, iters = g.replay, max(iters, 3)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps if graph else 1))
    return sorted(times)[len(times) // 2]


def decode_case(model: str, ctx: int, batch: int):
    h_q, h_kv, d = LLAMA_SHAPES[model]
    case = make_case([1] * batch, [ctx] * batch, h_q, h_kv, d, dtype=torch.bfloat16, device="cuda")
    return case, 2 * batch * ctx * h_kv * d * 2  # K and V bytes read


def decode_timing_table(bandwidth: float) -> list[str]:
    """Decode time (graph replay, default config) vs the time to read its K/V at the measured bandwidth."""
    lines = ["| model | batch | context | splits | triton us | torch eager us | KV MB | KV floor us | triton / floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in LLAMA_SHAPES:
        for batch, ctx in [(32, 512), (32, 2048), (1, 4096), (8, 4096), (128, 512)]:
            case, kv_bytes = decode_case(model, ctx, batch)
            floor = kv_bytes / bandwidth * 1e6
            ours = time_us(partial(attention.paged_attention_triton, *case, 0.1))
            ref = time_us(partial(paged_attention_torch, *case, 0.1), graph=False, iters=3) if batch == 32 else 0
            splits = attention.decode_splits(batch, LLAMA_SHAPES[model][1], ctx, torch.device("cuda"))
            lines.append(f"| {model} | {batch} | {ctx} | {splits} | {ours:.1f} | {ref:.0f} | {kv_bytes / 1e6:.1f} "
                         f"| {floor:.1f} | {ours / floor:.2f} |")
    return lines


DECODE_SWEEP = [(64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3), (32, 4, 3)]  # BLOCK_N, warps, stages


def decode_sweep(bandwidth: float, batch: int = 32) -> list[str]:
    """Floor ratio of decode configs (BLOCK_N, warps, stages) x splits at batch 32."""
    splits = [1, 2, 4]
    lines = ["| model | context | BLOCK_N, warps, stages | " + " | ".join(f"splits {s}" for s in splits)
             + " |", "|---|---|---|" + "---|" * len(splits)]
    default = attention.decode_config
    try:
        for model in LLAMA_SHAPES:
            for ctx in (512, 2048):
                case, kv_bytes = decode_case(model, ctx, batch)
                floor = kv_bytes / bandwidth * 1e6
                for block_n, warps, stages in DECODE_SWEEP:
                    config = dict(BLOCK_G=16, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                    attention.decode_config = lambda *_, c=config: c
                    ratios = [time_us(partial(attention.decode_attention_triton, *case, 0.1, num_splits=s))
                              / floor for s in splits]
                    lines.append(f"| {model} | {ctx} | {block_n}, {warps}, {stages} | "
                                 + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    finally:
        attention.decode_config = default
    return lines


def prefill_timing_table() -> list[str]:
    """Prefill throughput in causal-attention TFLOP/s (bf16) for a few tile configs (first: the default)."""
    configs = [None, (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3)]
    lines = ["| model | q_lens over kv_lens | BLOCK_M, BLOCK_N, warps, stages | triton us | TFLOP/s |",
             "|---|---|---|---|---|"]
    default = attention.prefill_config
    try:
        for model, (h_q, h_kv, d) in LLAMA_SHAPES.items():
            for q_lens, kv_lens in [([2048], [2048]), ([512] * 4, [2048] * 4)]:
                case = make_case(q_lens, kv_lens, h_q, h_kv, d, dtype=torch.bfloat16, device="cuda")
                pairs = sum(n * (kv - n) + n * (n + 1) / 2 for n, kv in zip(q_lens, kv_lens))
                for cfg in configs:
                    attention.prefill_config = default if cfg is None else (lambda *_, c=cfg: dict(
                        BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3]))
                    us = time_us(partial(attention.paged_attention_triton, *case, 0.1), reps=5)
                    lines.append(f"| {model} | {q_lens[0]}x{len(q_lens)} over {kv_lens[0]} | {cfg or 'default'} "
                                 f"| {us:.0f} | {4 * pairs * h_q * d / us / 1e6:.0f} |")
    finally:
        attention.prefill_config = default
    return lines


if __name__ == "__main__":
    bw = copy_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s; bf16; "
          "times are CUDA-graph replays\n", flush=True)
    for table in (decode_timing_table, decode_sweep):
        print("\n".join(table(bw)) + "\n", flush=True)
    print("\n".join(prefill_timing_table()), flush=True)
