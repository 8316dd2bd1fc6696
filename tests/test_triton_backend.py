"""The whole engine on the Triton backend (interpreted on CPU, compiled on GPU) equals HF + PEFT."""

from __future__ import annotations

import pytest
import torch
from test_parity import LORAS, peft_generate, peft_model, prompts

from punica import LLM, SamplingParams


@pytest.mark.parametrize("family,first", [("llama", False), ("qwen2", False), ("qwen3", False), ("phi3", False),
                                          ("llama", True)])
def test_triton_backend_mixed_batch_equals_peft(tiny_models, request, family, first):
    """`first`: every step's LoRA first, its expand overwriting y in the kernel (segments, tokens), then the
    GEMM adds to y (the `delta_first` fixture; as steps of more than layers.DELTA_FIRST_MIN_TOKENS tokens run)."""
    calls = request.getfixturevalue("delta_first") if first else None
    hf_model, model_dir, adapters = tiny_models[family]
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cpu", backend="triton")
    assert llm.engine.info.backend == "triton"
    ids = prompts(seed=11)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(ids, params, lora=LORAS)]
    assert ours == peft_generate(peft_model(hf_model, adapters), ids, LORAS, 6)
    assert calls is None or calls


def _nan_delta_deferred(self, x, batch):
    """LoRALinear.forward_deferred in the side stream's "delta" arrangement, without a second stream: the
    expand overwrites a NaN-filled delta (layers.DELTA_OVERWRITE), which the next kernel adds. NaN wherever the
    expand writes nothing: a graph bucket's padding rows, which must not reach the real tokens."""
    y = self.ops.linear(x, self.weight, self.bias)
    if self.lora_a is None or not batch.lora.has_lora:
        return y, None
    delta = torch.full((x.shape[0], self.slice_offsets[-1]), float("nan"), dtype=x.dtype)
    self.ops.add_lora(delta, x, self.lora_a, self.lora_b, batch.slot_rank, batch.lora, self.slice_offsets,
                      overwrite=True)
    return y, delta


@pytest.mark.parametrize("family,hybrid,decode_max,single_max,delta,persistent,sparse", [
    ("llama", 0, 0, 1, False, 0, 0), ("qwen2", 0, 0, 1, False, 0, 0), ("llama", 1, 0, 1, False, 0, 0),
    ("llama", 2, 0, 1, False, 0, 0), ("llama", 2, 4, 3, False, 0, 0), ("llama", 0, 0, 1, True, 0, 0),
    ("llama", 2, 4, 3, True, 0, 0), ("llama", 2, 8, 2, True, 0, 0), ("llama", 2, 4, 3, True, 2, 0),
    ("llama", 2, 0, 1, True, 0, 1.0), ("qwen3", 2, 4, 3, True, 0, 0)])
def test_padded_graph_batches_equal_peft(tiny_models, monkeypatch, family, hybrid, decode_max, single_max, delta,
                                         persistent, sparse):
    """The CUDA-graph runner's padded buffers, run eagerly (no capture on the CPU): decode buckets with
    per-token LoRA and mixed prefill/decode buckets with work lists (or, `hybrid` 1, both with hybrid work
    lists; 2: the mixed ones; `decode_max`: also decode buckets of at most that many sequences, with segments of
    at most `single_max` tokens as single-token items) give PEFT's
    tokens. A 24-token budget with 16-token buckets (and a 24 one) forces chunked prefills mixed with
    decodes. `delta`: every LoRA as an overwritten delta added by the next kernel, as on CUDA (the graphs'
    work lists cover the base-model tokens, so no zero-fill). `persistent`: the shrink and expand walk the work
    lists' real items (their counts in the graph buffers) on fixed grids (TUNING["shrink_persistent"],
    ["expand_persistent"]). `sparse`: decode steps with at most this fraction of single items run their
    bucket's sparse graph (a hybrid list the expand walks); 1.0: every decode step with adapters."""
    from punica.engine import cuda_graph
    from punica.engine.cuda_graph import CudaGraphRunner
    from punica.model.layers import LoRALinear
    from punica.ops import sgmv

    if delta:
        monkeypatch.setattr(LoRALinear, "forward_deferred", _nan_delta_deferred)

    hf_model, model_dir, adapters = tiny_models[family]
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cpu", backend="triton",
              max_num_seqs=8, max_num_batched_tokens=24)
    engine = llm.engine
    saved = {k: sgmv.TUNING[k] for k in ("hybrid_graphs", "hybrid_decode_max", "decode_single_max",
                                         "mixed_single_max", "persistent_min_batch", "shrink_persistent",
                                         "expand_persistent", "sparse_decode")}
    saved_bucket = cuda_graph.MIN_MIXED_BUCKET
    cuda_graph.MIN_MIXED_BUCKET = 16
    min_batch = 0 if persistent else saved["persistent_min_batch"]  # 0: item counts in every mixed graph
    sgmv.set_tuning(hybrid_graphs=hybrid, hybrid_decode_max=decode_max, decode_single_max=single_max,
                    mixed_single_max=single_max, persistent_min_batch=min_batch, sparse_decode=sparse)
    try:
        graphs = CudaGraphRunner(engine.model, engine.runner.slot_rank, 8, 24, engine.info.max_model_len,
                                 engine.config.cache.block_size, engine.runner.device)
    finally:
        cuda_graph.MIN_MIXED_BUCKET = saved_bucket
        sgmv.set_tuning(**saved)
    assert (graphs.graphs[("decode", 8, True)][2].lora.num_single == 8) == (hybrid == 1 or decode_max >= 8)
    assert (graphs.graphs[("decode", 2, True)][2].lora.num_single == 2) == (hybrid == 1 or decode_max >= 2)
    assert graphs.buf.single_max("decode") == graphs.buf.single_max("mixed") == single_max
    assert bool(graphs.graphs[("mixed", 16, True)][2].lora.num_single) == (hybrid > 0)
    # item counts (the persistent walk) in mixed graphs only, and at this batch of 8 only when forced
    assert (graphs.graphs[("mixed", 16, True)][2].lora.item_count is not None) == bool(persistent)
    assert all(graphs.graphs[("decode", b, True)][2].lora.item_count is None for b in graphs.buckets)
    sparse_graphs = [batch.lora for (kind, _, _), (_, _, batch) in graphs.graphs.items() if kind == "sparse"]
    assert len(sparse_graphs) == (len(graphs.buckets) if sparse else 0)
    assert all(lora.item_count is not None and lora.num_single for lora in sparse_graphs)
    assert graphs.token_buckets == [16, 24]
    engine.runner.graphs = graphs
    used = []
    run = graphs.run
    graphs.run = lambda hb, *rest: used.append(graphs.key(hb)[0]) or run(hb, *rest)
    ids = prompts(seed=12)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    if persistent:
        sgmv.set_tuning(shrink_persistent=persistent, expand_persistent=persistent)
    try:
        ours = [o.token_ids for o in llm.generate(ids, params, lora=LORAS)]
    finally:
        sgmv.set_tuning(**saved)
    assert {"sparse" if sparse else "decode", "mixed"} <= set(used)
    assert ours == peft_generate(peft_model(hf_model, adapters), ids, LORAS, 5)


def test_prefix_cache_through_padded_graph_batches(tiny_models):
    """The CUDA-graph runner's padded buffers, run eagerly on the interpreter: later requests take an earlier
    one's prompt blocks per adapter, their first chunks start after them in mixed buckets, and the tokens equal
    those of an engine without the cache."""
    from test_engine import shared_prefix_prompts

    from punica.engine import cuda_graph
    from punica.engine.cuda_graph import CudaGraphRunner

    _, model_dir, adapters = tiny_models["llama"]
    first, later = shared_prefix_prompts(2, seed=45), shared_prefix_prompts(6, seed=45)[2:]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = []
    for caching in (True, False):
        llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cpu", backend="triton",
                  max_num_seqs=4, max_num_batched_tokens=48, enable_prefix_caching=caching)
        engine = llm.engine
        saved_bucket, cuda_graph.MIN_MIXED_BUCKET = cuda_graph.MIN_MIXED_BUCKET, 16
        try:
            graphs = CudaGraphRunner(engine.model, engine.runner.slot_rank, 4, 48, engine.info.max_model_len,
                                     engine.config.cache.block_size, engine.runner.device)
        finally:
            cuda_graph.MIN_MIXED_BUCKET = saved_bucket
        assert graphs.token_buckets == [16, 32, 48]
        engine.runner.graphs = graphs
        used: list[tuple] = []
        graphs.run = lambda hb, *rest, graphs=graphs, run=graphs.run, used=used: (used.append(graphs.key(hb))
                                                                                 or run(hb, *rest))
        outs.append([o.token_ids for o in llm.generate(first, params, lora=["a4", None])])
        used.clear()
        outs[-1] += [o.token_ids for o in llm.generate(later, params, lora=["a4", None, "a4", "b8"])]
        assert engine.blocks.hit_tokens == (3 * 32 if caching else 0)  # b8 computed nothing before
        assert used[0][0] == "mixed"  # the later prompts' remaining tokens (13 each, or 45 for b8) in a bucket
    assert outs[0] == outs[1]
