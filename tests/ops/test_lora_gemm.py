"""lora_linear: the projection and its LoRA in one launch (ops/lora_gemm.py), against the torch reference.

CPU tier: the interpreter, small shapes, fp32/fp16. GPU tier: Llama-2-7B shapes in bf16 against an fp32
reference over the popularities, and CUDA-graph replays bitwise equal to eager (the counters reset)."""

from __future__ import annotations

import pytest
import torch
from test_sgmv import gpu, interpreted, make_plan, make_weights, needs_cuda, offsets, workload_plan

from punica.ops import lora_gemm
from punica.ops.lora_gemm import lora_linear_torch, lora_linear_triton
from punica.testing import assert_close
from punica.workload import POPULARITIES


@pytest.fixture
def config():
    saved, shapes = dict(lora_gemm.CONFIG), dict(lora_gemm.SHAPES)
    yield lora_gemm.set_config
    lora_gemm.CONFIG.update(saved)
    lora_gemm.SHAPES.clear()
    lora_gemm.SHAPES.update(shapes)
    lora_gemm._launch_config.cache_clear()


def run_case(plan, h_in, widths, R, ranks, dtype, device, bias=False, num_slots=9, seed=0, lora=True):
    """(lora_linear_triton's y, fp32 reference y, counters after the call)."""
    T = len(plan.token_slot)
    lora_a, lora_b, slot_rank = make_weights(num_slots, h_in, widths, R, ranks, dtype, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(T, h_in, generator=gen, device=device).to(dtype)
    w = (torch.randn(sum(widths), h_in, generator=gen, device=device) / h_in ** 0.5).to(dtype)
    b = torch.randn(sum(widths), generator=gen, device=device).to(dtype) if bias else None
    args = (lora_a, lora_b, slot_rank, plan) if lora else (None, None, None, None)
    expected = lora_linear_torch(x.float(), w.float(), None if b is None else b.float(),
                                 *(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                   for t in args), offsets(widths))
    counters = torch.zeros(4, dtype=torch.int32, device=device)
    y = lora_linear_triton(x, w, b, *args, offsets(widths), counters=counters)
    return y, expected, counters


WIDTHS = {"one": (48,), "gqa_qkv": (32, 16, 16), "gate_up": (32, 32)}


@interpreted
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_seqs", [1, 5, 17])
@pytest.mark.parametrize("widths", WIDTHS.values(), ids=WIDTHS.keys())
def test_matches_reference(config, popularity, num_seqs, widths):
    config(block_n=32, block_k=32, shrink_block_k=32, epilogue_r=4)
    plan = workload_plan(popularity, num_seqs, num_adapters=8, prefill=False, device="cpu")
    y, expected, counters = run_case(plan, 48, widths, 16, (16, 8, 5, 1), torch.float32, "cpu")
    assert_close(y, expected)
    assert not counters.any()  # reset by the last program: the next launch (a graph replay) starts clean


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["bias", "no_lora", "odd_k", "rank_chunks", "all_slot0", "odd_slices"])
def test_cases(config, dtype, case):
    """Bias; the plain projection; K not a multiple of the tiles (several shrink partials); ranks over
    several epilogue chunks and a non-power-of-two rank; a step where no token has an adapter; slices no tile
    width divides (cuBLAS + SGMV instead)."""
    config(block_n=32, block_k=32, shrink_block_k=16, epilogue_r=4)
    slots = [0, 0, 0] if case == "all_slot0" else [0, 1, 2, 3, 4]
    plan = make_plan([1] * len(slots), slots, "cpu")
    R, ranks = (24, (24, 13, 1)) if case == "rank_chunks" else (16, (16, 9, 1))
    h_in = 70 if case == "odd_k" else 48
    widths = (40, 12) if case == "odd_slices" else (32, 16)
    y, expected, counters = run_case(plan, h_in, widths, R, ranks, dtype, "cpu", bias=case == "bias",
                                     num_slots=5, lora=case != "no_lora")
    assert_close(y, expected, dtype=dtype)
    assert not counters.any()


@interpreted
def test_bad_input_is_named():
    x, w = torch.zeros(2, 8), torch.zeros(4, 9)
    with pytest.raises(ValueError, match="must be"):
        lora_linear_triton(x, w, None, None, None, None, None, (0, 4))


# ---- GPU tier ----------------------------------------------------------------------------------------

LLAMA = {"qkv": (4096, (4096, 4096, 4096)), "o": (4096, (4096,)), "gate_up": (4096, (11008, 11008)),
         "down": (11008, (4096,))}


@gpu
@needs_cuda
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("tokens", [1, 7, 32, 64])
@pytest.mark.parametrize("proj", LLAMA)
def test_llama_shapes_bf16(popularity, tokens, proj):
    h_in, widths = LLAMA[proj]
    plan = workload_plan(popularity, tokens, num_adapters=64, prefill=False, device="cuda")
    y, expected, counters = run_case(plan, h_in, widths, 16, (16, 8, 64 // 8), torch.bfloat16, "cuda",
                                     num_slots=65)
    assert_close(y, expected, dtype=torch.bfloat16)
    assert not counters.any()


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 16, 32, 33])
@pytest.mark.parametrize("shape", [(12288, 4096), (4096, 4096), (22016, 4096)])
def test_plain_linear_bf16(monkeypatch, tokens, shape):
    """linear_triton: the Triton GEMM where PLAIN_SHAPES lists the shape (up to 32 tokens), cuBLAS elsewhere."""
    calls = []
    kernel = lora_gemm.lora_linear_triton
    monkeypatch.setattr(lora_gemm, "lora_linear_triton", lambda *a: calls.append(1) or kernel(*a))
    x = torch.randn(tokens, shape[1], device="cuda").bfloat16()
    w = (torch.randn(*shape, device="cuda") / 64).bfloat16()
    y = lora_gemm.linear_triton(x, w)
    assert_close(y, x.float() @ w.float().T, dtype=torch.bfloat16)
    assert bool(calls) == (tokens <= 32 and shape in lora_gemm.PLAIN_SHAPES)


@gpu
@needs_cuda
def test_graph_replay_is_bitwise_eager():
    h_in, widths = LLAMA["qkv"]
    plan = workload_plan("uniform", 32, num_adapters=16, prefill=False, device="cuda")
    lora_a, lora_b, slot_rank = make_weights(17, h_in, widths, 16, (16, 4), torch.bfloat16, "cuda")
    x = torch.randn(32, h_in, device="cuda").bfloat16()
    w = torch.randn(sum(widths), h_in, device="cuda").bfloat16() / 64
    counters = torch.zeros(4, dtype=torch.int32, device="cuda")

    def run():
        return lora_linear_triton(x, w, None, lora_a, lora_b, slot_rank, plan, offsets(widths), counters)

    eager = run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    assert not counters.any()
