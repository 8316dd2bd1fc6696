"""The decode GEMM (ops/gemm.py) against torch.

CPU tier: the interpreter, small and odd shapes, fp32/fp16. GPU tier: the Llama-2-7B shapes in bf16 against
an fp32 reference, `linear_triton`'s choice between it and cuBLAS, and CUDA-graph replay equal to eager."""

from __future__ import annotations

import pytest
import torch
from test_sgmv import gpu, interpreted, needs_cuda

from punica.ops import gemm
from punica.testing import assert_close


@pytest.fixture
def config():
    saved, shapes = dict(gemm.CONFIG), dict(gemm.SHAPES)
    yield gemm.set_config
    gemm.CONFIG.update(saved)
    gemm.SHAPES.clear()
    gemm.SHAPES.update(shapes)


def operands(T, N, K, dtype, device, bias=False, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, K, generator=gen, device=device).to(dtype)
    w = (torch.randn(N, K, generator=gen, device=device) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=gen, device=device).to(dtype) if bias else None
    return x, w, b


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("T,N,K,bias", [(1, 64, 64, False), (5, 48, 70, True), (17, 100, 32, False),
                                        (33, 32, 128, True)])
def test_matches_torch(config, dtype, split_k, T, N, K, bias):
    """Token counts over one and several row tiles, N and K not multiples of the tiles, a bias; K in one
    piece or split over up to 3 programs per tile (fewer where K is short), the counters reset after."""
    config(block_n=32, block_k=32, stages=2, split_k=split_k)
    x, w, b = operands(T, N, K, dtype, "cpu", bias)
    expected = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert_close(gemm.gemm_triton(x, w, b), expected, dtype=dtype)
    assert_close(gemm.gemm_triton(x, w, b), expected, dtype=dtype)  # again: the split counters were reset
    if split_k > 1:
        assert not gemm._lock_buffer(x.device, "gemm").any()


def fp8_operands(T, N, K, dtype, device, bias=False, seed=0):
    """x, the float8 weight, its row scales, the bias, and y's reference in fp32 (against the dequantized
    weight). Rows of W span 2^-6 to 2^6 in size, so a scale applied to the wrong axis cannot pass; W's column 1
    is tiny (1e-5 of its row's largest magnitude), so it quantizes to subnormal float8 values."""
    x, w, b = operands(T, N, K, torch.float32, device, bias, seed)
    w = w * torch.logspace(-6, 6, N, base=2.0, device=device)[:, None]
    w[:, 1] = 1e-5 * w.abs().amax(1)
    q, scale = gemm.quantize_rows_fp8(w)
    expected = torch.nn.functional.linear(x, gemm.dequantize_rows(q, scale, torch.float32), b)
    return x.to(dtype), q, scale, None if b is None else b.to(dtype), expected


def test_quantize_rows_fp8():
    """Per row: the largest magnitude becomes +-448 (FP8_MAX), every element is within e4m3's rounding (3
    mantissa bits: 2^-4 relative, 2^-9 of the scale absolute near zero), an all-zero row stays zero, and
    chunking does not change the result."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(37, 50, generator=gen) * torch.logspace(-8, 8, 37, base=2.0)[:, None]
    w[5] = 0
    q, scale = gemm.quantize_rows_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (37,)
    qf = q.float()
    rows = [i for i in range(37) if i != 5]
    assert torch.equal(qf[rows].abs().amax(1), torch.full((36,), gemm.FP8_MAX))
    assert not qf[5].any() and scale[5] > 0
    deq = gemm.dequantize_rows(q, scale, torch.float32)
    assert ((deq - w).abs() <= w.abs() / 16 + scale[:, None] * 2 ** -9).all()
    q2, scale2 = gemm.quantize_rows_fp8(w, chunk_rows=4)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale2, scale)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("T,N,K,bias", [(1, 64, 64, False), (5, 48, 70, True), (40, 100, 96, True),
                                        (130, 72, 64, False)])
def test_fp8_weights(config, dtype, split_k, T, N, K, bias):
    """Float8 weights with row scales (quantization "fp8"), in one K piece or split, over one or several row
    tiles, and past MAX_TOKENS tokens LARGE_CONFIG's; linear_torch (the CPU's path) computes the same."""
    config(block_n=32, block_k=32, stages=2, split_k=split_k)
    x, q, scale, b, expected = fp8_operands(T, N, K, dtype, "cpu", bias)
    assert_close(gemm.gemm_triton(x, q, b, scale), expected, dtype=dtype)
    assert_close(gemm.linear_torch(x, q, b, weight_scale=scale), expected, dtype=dtype)
    assert_close(gemm.linear_triton(x, q, b, weight_scale=scale), expected, dtype=dtype)  # CPU tensors: torch


@interpreted
def test_fp8_dot_a8(config):
    """fp8_dot "a8": x rounded to float8 per token and K tile as well; close to the reference within x's rounding
    (e4m3: 2^-4 relative an element), and not equal to the exact path."""
    config(block_n=32, block_k=32, stages=2, fp8_dot=gemm.FP8_DOTS.index("a8"))
    x, q, scale, _, expected = fp8_operands(9, 64, 96, torch.float16, "cpu")
    y = gemm.gemm_triton(x, q, None, scale)
    assert_close(y, expected, dtype=torch.float16, factor=40)
    config(fp8_dot=0)
    assert not torch.equal(y, gemm.gemm_triton(x, q, None, scale))


def test_fp8_weights_bad_input():
    x, q, scale, _, _ = fp8_operands(3, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="one float32 scale per row"):
        gemm.linear_torch(x, q, weight_scale=scale[:4])
    with pytest.raises(ValueError, match="one float32 scale per row"):
        gemm.linear_torch(x, q.float(), weight_scale=scale)
    with pytest.raises(ValueError, match="one float32 scale per row"):
        gemm.linear_torch(x, q, weight_scale=scale.double())


def test_load_config(config, tmp_path, monkeypatch):
    """bench_gemm's saved measurements: per-shape tiles, and the shapes the engine runs on this GEMM."""
    import json

    monkeypatch.setattr(gemm, "PLAIN_SHAPES", {(1, 2)})
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"shapes": [[4096, 11008, {"split_k": 2, "stages": 7}]], "plain": [[4096, 11008]]}))
    gemm.load_config(str(path))
    assert gemm.SHAPES[(4096, 11008)] == {"split_k": 2, "stages": 7}
    assert gemm.PLAIN_SHAPES == {(4096, 11008)}


@interpreted
def test_per_shape_knobs_and_bad_input(config):
    config((48, 64), block_n=16)
    assert gemm.SHAPES[(48, 64)]["block_n"] == 16
    x, w, _ = operands(3, 48, 64, torch.float32, "cpu")
    assert_close(gemm.gemm_triton(x, w), x @ w.T)
    with pytest.raises(KeyError, match="unknown GEMM knob"):
        gemm.set_config(block_q=1)
    with pytest.raises(ValueError, match="must be"):
        gemm.gemm_triton(x, torch.zeros(4, 9))
    assert torch.equal(gemm.linear_triton(x, w), torch.nn.functional.linear(x, w))  # CPU tensors: torch


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 16, 32, 33])
@pytest.mark.parametrize("shape", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)])
def test_llama_shapes_bf16(monkeypatch, tokens, shape):
    """linear_triton: this GEMM where PLAIN_SHAPES lists the shape (up to MAX_TOKENS tokens), cuBLAS elsewhere;
    the GEMM itself at every shape."""
    calls = []
    kernel = gemm.gemm_triton
    monkeypatch.setattr(gemm, "gemm_triton", lambda *a: calls.append(1) or kernel(*a))
    x, w, _ = operands(tokens, *shape, torch.bfloat16, "cuda")
    expected = x.float() @ w.float().T
    assert_close(gemm.linear_triton(x, w), expected, dtype=torch.bfloat16)
    assert bool(calls) == (tokens <= gemm.MAX_TOKENS and shape in gemm.PLAIN_SHAPES)
    calls.clear()
    monkeypatch.setattr(gemm, "BESIDE_LORA", False)
    assert_close(gemm.linear_triton(x, w, beside_lora=True), expected, dtype=torch.bfloat16)
    assert not calls  # steps with LoRA keep cuBLAS unless BESIDE_LORA
    assert_close(kernel(x, w), expected, dtype=torch.bfloat16)


@gpu
@needs_cuda
@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_graph_replay_equals_eager(config, split_k):
    """Replays equal eager bitwise (split-K sums its partials in a fixed order) and match the reference."""
    config(split_k=split_k)
    x, w, b = operands(32, 4096, 11008, torch.bfloat16, "cuda", bias=True)
    eager = gemm.gemm_triton(x, w, b)
    assert_close(eager, torch.nn.functional.linear(x.float(), w.float(), b.float()), dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm.gemm_triton(x, w, b)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    assert not gemm._lock_buffer(x.device, "gemm").any()


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 17, 32, 33, 256, 1000])
@pytest.mark.parametrize("shape", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)])
def test_llama_shapes_fp8_weights(tokens, shape):
    """Float8 weights in bf16 steps against the dequantized weight in fp32: the shapes' tiles up to MAX_TOKENS
    tokens, LARGE_CONFIG's past them; linear_triton runs this GEMM at every token count."""
    x, q, scale, _, expected = fp8_operands(tokens, *shape, torch.bfloat16, "cuda")
    assert_close(gemm.gemm_triton(x, q, None, scale), expected, dtype=torch.bfloat16)
    assert torch.equal(gemm.linear_triton(x, q, weight_scale=scale), gemm.gemm_triton(x, q, None, scale))


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens,split_k", [(32, 1), (32, 2), (300, 1)])
def test_fp8_graph_replay_equals_eager(config, tokens, split_k):
    config(split_k=split_k)
    x, q, scale, b, expected = fp8_operands(tokens, 4096, 11008, torch.bfloat16, "cuda", bias=True)
    eager = gemm.gemm_triton(x, q, b, scale)
    assert_close(eager, expected, dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm.gemm_triton(x, q, b, scale)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
