"""GPU tier: the engine on CUDA with the Triton kernels and decode CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from test_dora import LORAS as DORA_LORAS
from test_dora import dora_models, peft_one_by_one  # noqa: F401 (a fixture)
from test_engine import generate_with_kv_dtypes, logprob_rows
from test_parity import LORAS, peft_generate, peft_model, prompts

from punica import LLM, SamplingParams
from punica.engine.request import Sequence
from punica.engine.runner import host_batch
from punica.testing import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_cuda_fp32_mixed_batch_equals_peft(tiny_models, family):
    hf_model, model_dir, adapters = tiny_models[family]
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cuda")
    assert llm.engine.info.backend == "triton" and llm.engine.runner.graphs is not None
    ids = prompts(seed=21)
    ours = [o.token_ids for o in llm.generate(ids, GREEDY, lora=LORAS)]
    assert ours == peft_generate(peft_model(hf_model, adapters), ids, LORAS, 10)


def test_cuda_longrope_generates_as_on_cpu(tmp_path):
    """Longrope on CUDA (Triton rope kernels reading the long-context half of the table, decode graphs): a prompt
    within the pretraining length whose output crosses it, and one past it, in one batch, as the CPU engine
    generates them (which test_loader checks against transformers 5.24's generate). Not against the GPU machine's
    own transformers: from the crossing on, its generate's tokens differ from 5.24's (seen once, not analysed)."""
    from factories import make_longrope_phi3

    make_longrope_phi3(seed=3).save_pretrained(str(tmp_path))
    prompts = [[(5 * i + 3) % 128 for i in range(58)], [(3 * i + 1) % 128 for i in range(100)]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(model=str(tmp_path), dtype="float32", device=device)
        outs[device] = [o.token_ids for o in llm.generate(prompts, params)]
    assert llm.engine.runner.graphs is not None and outs["cuda"] == outs["cpu"]


@pytest.mark.parametrize("sparse", [0, 1.0])
def test_cuda_graph_replay_equals_eager(tiny_models, sparse):
    """A decode step replayed from its bucket's graph equals the same padded batch run eagerly (bitwise)
    and the unpadded eager step (bf16 tolerance). `sparse` 1.0: from the bucket's sparse graph (a hybrid list
    the expand walks, TUNING["sparse_decode"])."""
    from punica.ops import sgmv
    _, model_dir, adapters = tiny_models["llama"]
    saved = dict(sgmv.TUNING)
    sgmv.set_tuning(sparse_decode=sparse)
    try:
        llm = LLM(model=model_dir, lora_modules=adapters, dtype="bfloat16", device="cuda", max_num_seqs=16)
    finally:
        sgmv.set_tuning(**saved)
    engine, graphs = llm.engine, llm.engine.runner.graphs
    seqs = _sequences(engine, seed=22)
    for s in seqs:
        s.num_computed = len(s.tokens) - 1  # decode the last prompt token
    hb = host_batch([(s, 1) for s in seqs], engine.runner.block_size)
    for s in seqs:  # fill the KV of the prefix eagerly
        s.num_computed = 0
    engine.model(engine.runner.build_batch([(s, len(s.tokens) - 1) for s in seqs]))
    assert graphs.key(hb)[0] == ("sparse" if sparse else "decode")
    replayed = graphs.run(hb).clone()
    eager = engine.model(graphs.padded_batch(hb))[: len(seqs)]
    assert torch.equal(replayed, eager)
    graph_vs_plain = engine.model(engine.runner.build_batch([(s, 1) for s in _at_decode(seqs)]))
    assert_close(replayed, graph_vs_plain, dtype=torch.bfloat16)


@pytest.mark.parametrize("persistent", [False, True])
def test_mixed_step_graph_replay_equals_eager(tiny_models, persistent):
    """A step mixing prefill chunks (one per adapter) with decodes runs from a mixed-bucket graph: replay
    equals the same padded batch run eagerly (bitwise) and the unpadded eager step (bf16 tolerance).
    `persistent`: the graph's list carries its item counts at this small batch too, so the shrink and expand
    walk the real items on fixed grids (TUNING["persistent_min_batch"])."""
    from punica.ops import sgmv
    _, model_dir, adapters = tiny_models["llama"]
    saved = dict(sgmv.TUNING)
    sgmv.set_tuning(persistent_min_batch=0 if persistent else 1 << 20, shrink_persistent=8 * persistent)
    try:
        llm = LLM(model=model_dir, lora_modules=adapters, dtype="bfloat16", device="cuda", max_num_seqs=16,
                  max_num_batched_tokens=256)
        _check_mixed_replay(llm)
    finally:
        sgmv.set_tuning(**saved)
    mixed = [batch.lora for (kind, _, with_lora), (_, _, batch) in llm.engine.runner.graphs.graphs.items()
             if kind == "mixed" and with_lora]
    assert mixed and all((lora.item_count is not None) == persistent for lora in mixed)


def _check_mixed_replay(llm):
    engine, graphs = llm.engine, llm.engine.runner.graphs
    seqs = _sequences(engine, seed=25)
    work = [(s, len(s.tokens) if i % 2 else 1) for i, s in enumerate(seqs)]  # odd ones: whole prompt
    for s, n in work:  # the decodes' prefixes go in eagerly first
        if n == 1:
            engine.model(engine.runner.build_batch([(s, len(s.tokens) - 1)]))
            s.num_computed = len(s.tokens) - 1
    hb = host_batch(work, engine.runner.block_size)
    assert graphs.key(hb)[0] == "mixed"
    replayed = graphs.run(hb).clone()
    eager = engine.model(graphs.padded_batch(hb))[: len(hb.logits_indices)]
    assert torch.equal(replayed, eager)
    plain = engine.model(engine.runner.build_batch(work))
    assert_close(replayed, plain, dtype=torch.bfloat16)


def _sequences(engine, seed):
    """One sequence per test prompt, with KV blocks for it plus one token and its adapter's slot, in slot
    order (as the runner orders a step)."""
    seqs = []
    for i, (ids, name) in enumerate(zip(prompts(seed=seed), LORAS)):
        seq = Sequence(request_id=f"s{seed}-{i}", prompt_ids=ids, params=GREEDY, lora=name)
        engine.blocks.grow(seq.block_table, len(ids) + 1)
        seq.slot = engine.adapters.acquire(name) if name else 0
        seqs.append(seq)
    return sorted(seqs, key=lambda s: s.slot)


def _at_decode(seqs):
    for s in seqs:
        s.num_computed = len(s.tokens) - 1
    return seqs


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_delta_first_steps_equal_gemm_first(tiny_models, request, family):
    """Every step with its LoRA first and the GEMM adding to it (the `delta_first` fixture, as steps of more than
    512 tokens run): fp32 tokens equal PEFT's (graphs and eager steps); in bf16 a mixed graph replays bitwise as
    its padded batch run eagerly, and logits stay close to the GEMM-first ones. qwen2's qkv has a bias and keeps
    the GEMM first."""
    from test_parity import last_token_logits

    hf_model, model_dir, adapters = tiny_models[family]
    ids = prompts(seed=28)
    gemm_first = last_token_logits(LLM(model=model_dir, lora_modules=adapters, dtype="bfloat16", device="cuda"),
                                   ids, LORAS)
    calls = request.getfixturevalue("delta_first")
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cuda")
    assert [o.token_ids for o in llm.generate(ids, GREEDY, lora=LORAS)] == \
        peft_generate(peft_model(hf_model, adapters), ids, LORAS, 10)
    assert calls
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="bfloat16", device="cuda", max_num_seqs=16,
              max_num_batched_tokens=256)
    _check_mixed_replay(llm)
    assert_close(last_token_logits(llm, ids, LORAS), gemm_first, dtype=torch.bfloat16)


def test_graphs_and_eager_generate_the_same_tokens(tiny_models):
    """fp32: graphs pad the token count to a bucket, so their GEMMs may pick other kernels than the eager
    step's; in bf16 that rounding flips near-tied argmaxes of the tiny random model (replay against the
    same padded batch run eagerly is bitwise equal: the two tests above)."""
    _, model_dir, adapters = tiny_models["llama"]
    ids = prompts(seed=23)
    outs = []
    for eager in (False, True):
        llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cuda", enforce_eager=eager)
        outs.append([o.token_ids[:3] for o in llm.generate(ids, GREEDY, lora=LORAS)])
    assert outs[0] == outs[1]


def test_logprobs_from_graph_steps_equal_the_cpu_engines(tiny_models):
    """fp32 on CUDA with graphs (steps launched ahead, tokens and logprobs read a step later; steps computing
    prompt logprobs run eagerly) against the CPU engine: the same greedy tokens under penalties, their logprobs
    and top-3 alternatives, and the prompts' logprobs; one request asking for none."""
    _, model_dir, adapters = tiny_models["llama"]
    ids = prompts(seed=24)
    asks = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3, prompt_logprobs=2,
                          presence_penalty=0.5, frequency_penalty=1.0,  # they count the token still in flight
                          repetition_penalty=1.3)
    params = [asks] * (len(ids) - 1) + [GREEDY]
    outs = []
    for device in ("cuda", "cpu"):
        llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device=device)
        rids, done = llm.engine.add_requests(ids, params, LORAS), {}
        while llm.engine.has_unfinished():
            done.update({o.request_id: o for o in llm.engine.step() if o.finished})
        outs.append([done[rid] for rid in rids])
    assert outs[0][-1].logprobs is None and outs[0][-1].prompt_logprobs is None
    for gpu, cpu in zip(outs[0][:-1], outs[1][:-1]):
        assert gpu.token_ids[:3] == cpu.token_ids[:3] and len(gpu.logprobs) == len(gpu.token_ids)
        assert [lp.logprob for lp in gpu.prompt_logprobs[1:]] == pytest.approx(
            [lp.logprob for lp in cpu.prompt_logprobs[1:]], abs=1e-3)
        for a, b in zip(gpu.logprobs[:3], cpu.logprobs[:3]):
            assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
            assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-3)


def test_fp8_kv_cache_on_cuda_equals_the_torch_reference(tiny_models):
    """kv_cache_dtype "fp8" with the Triton kernels (K/V rounded into float8 e4m3 by the store kernel, read back by
    the attention kernels, in CUDA graphs) against the torch ops on the CPU with the same fp8 cache: the prompts'
    logprobs and the first draws' top logprobs agree, and differ from the fp32 cache's."""
    _, model_dir, adapters = tiny_models["llama"]
    ids = prompts(seed=31)
    _, (cuda_fp8, cuda_full) = generate_with_kv_dtypes(model_dir, adapters, ids, ("fp8", "auto"), device="cuda")
    _, (cpu_fp8,) = generate_with_kv_dtypes(model_dir, adapters, ids, ("fp8",), device="cpu")
    for gpu, cpu, full in zip(cuda_fp8, cpu_fp8, cuda_full):
        assert logprob_rows(gpu) == pytest.approx(logprob_rows(cpu), abs=5e-3)
        assert logprob_rows(gpu) != pytest.approx(logprob_rows(full), abs=1e-4)
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cuda", kv_cache_dtype="fp8")
    graphed = [o.token_ids[:3] for o in llm.generate(ids, GREEDY, lora=LORAS)]
    cpu = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cpu", kv_cache_dtype="fp8")
    assert graphed == [o.token_ids[:3] for o in cpu.generate(ids, GREEDY, lora=LORAS)]


def test_fp8_weights_on_cuda_equal_the_torch_reference(tiny_models):
    """quantization "fp8" on CUDA: the Triton GEMM on float8 weights, in fp16, prefill eager and decode in CUDA
    graphs, a mixed-adapter batch, against the CPU engine's torch ops on float8 weights in fp32: the prompts'
    logprobs and every decode step's top logprobs agree to fp16 rounding (while the tokens agree)."""
    from punica.ops import gemm

    _, model_dir, adapters = tiny_models["llama"]
    ids = prompts(seed=33)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=1)
    gpu = LLM(model=model_dir, lora_modules=adapters, dtype="float16", device="cuda", quantization="fp8")
    assert gpu.engine.runner.graphs is not None and gpu.engine.model.ops.linear is gemm.linear_triton
    cpu = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cpu", quantization="fp8")
    compared = 0
    for a, b in zip(gpu.generate(ids, params, lora=LORAS), cpu.generate(ids, params, lora=LORAS)):
        assert logprob_rows(a) == pytest.approx(logprob_rows(b), abs=2e-2)
        for i in range(1, 6):
            if a.token_ids[:i] != b.token_ids[:i]:
                break
            assert [v for _, v in a.logprobs[i].top] == pytest.approx([v for _, v in b.logprobs[i].top], abs=2e-2)
            compared += 1
    assert compared >= 3 * len(ids)


def test_logit_bias_on_cuda_forces_its_token(tiny_models):
    """The bias entries reach the device asynchronously (pinned copy) and shift their row alone."""
    _, model_dir, adapters = tiny_models["llama"]
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="bfloat16", device="cuda")
    ids = prompts(2, seed=25)
    rids = llm.engine.add_requests(ids, [GREEDY, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                                logit_bias={77: 100.0})], LORAS[:2])
    done = {}
    while llm.engine.has_unfinished():
        done.update({o.request_id: o for o in llm.engine.step() if o.finished})
    assert done[rids[1]].token_ids == [77] * 10 and done[rids[0]].token_ids != [77] * 10


def test_json_mode_on_cuda_graph_steps(tiny_models, tmp_path):
    """JSON-mode masks on the device, after the CUDA graphs' logits (test_json_mode.json_mode_batch); the
    previous step is read while the graph runs, and constrained requests advance every step."""
    from test_json_mode import byte_tokenizer_model, json_mode_batch

    assert json_mode_batch(*byte_tokenizer_model(tiny_models, tmp_path), "cuda", "bfloat16") <= 43


def test_regex_and_choice_mode_on_cuda_graph_steps(tiny_models, tmp_path):
    """Regex and choice masks (with the end tokens where the output may end) after the CUDA graphs' logits
    (test_json_mode.regex_mode_batch)."""
    from test_json_mode import byte_tokenizer_model, regex_mode_batch

    regex_mode_batch(*byte_tokenizer_model(tiny_models, tmp_path), "cuda", "bfloat16")


def test_bf16_logits_close_to_peft(tiny_models):
    from test_parity import last_token_logits

    hf_model, model_dir, adapters = tiny_models["llama"]
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="bfloat16", device="cuda")
    peft = peft_model(hf_model, adapters).to("cuda", torch.bfloat16)
    ids = prompts(seed=24)
    with torch.no_grad():
        ref = peft(input_ids=torch.tensor(ids, device="cuda"), adapter_names=[n or "__base__" for n in LORAS])
    assert_close(last_token_logits(llm, ids, LORAS), ref.logits[:, -1].float(), dtype=torch.bfloat16, factor=2)


def test_lora_side_stream_matches_one_stream(tiny_models):
    """Every LoRA-overlap arrangement (a second stream, inside graphs too) gives the one-stream logits."""
    from test_parity import last_token_logits

    _, model_dir, adapters = tiny_models["llama"]
    ids = prompts(seed=26)
    logits = []
    for overlap, priority in (("none", 0), ("delta", 0), ("delta", -1), ("shrink", 0), ("shrink", -1), ("auto", 0)):
        llm = LLM(model=model_dir, lora_modules=adapters, dtype="bfloat16", device="cuda", lora_overlap=overlap,
                  lora_stream_priority=priority)
        side = llm.engine.model.layers[0].mlp.down_proj.side_stream
        assert (side is not None) == (overlap != "none")
        assert side is None or (side.priority < 0) == (priority < 0)
        logits.append(last_token_logits(llm, ids, LORAS))
        outs = [o.token_ids for o in llm.generate(ids, GREEDY, lora=LORAS)]
        assert all(len(o) == GREEDY.max_tokens for o in outs)
    for other in logits[1:]:
        assert_close(logits[0], other, dtype=torch.bfloat16)


def test_steps_over_max_graph_tokens_run_eagerly(tiny_models, caplog):
    """max_graph_tokens caps the mixed-step graphs; bigger steps run eagerly and give the same tokens. The
    capture is logged with its graph count."""
    _, model_dir, adapters = tiny_models["llama"]
    ids = [p * 6 for p in prompts(seed=27)]  # 8 x 42 tokens: prefill steps of up to 256 tokens
    outs = []
    for cap in (None, 64):
        with caplog.at_level("INFO", logger="punica.engine"):
            llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cuda",
                      max_num_batched_tokens=256, max_graph_tokens=cap)
        graphs = llm.engine.runner.graphs
        assert graphs.token_buckets[-1] == (cap or 256)
        assert f"captured {len(graphs.graphs)} CUDA graphs in" in caplog.text
        outs.append([o.token_ids for o in llm.generate(ids, GREEDY, lora=LORAS)])
    assert outs[0] == outs[1]


def test_programmatic_dependent_launch_changes_no_bit(tiny_models):
    """With PDL (ops/pdl.py) every kernel waits for the one before it: logits and tokens are bitwise those
    without it, in graphs (decode and mixed steps) and eagerly."""
    from test_parity import last_token_logits

    from punica.ops import pdl

    _, model_dir, adapters = tiny_models["llama"]
    ids = prompts(seed=28)
    pdl.set_pdl(False)
    assert pdl.options(torch.zeros(1, device="cuda")) == {"PDL": False}
    results = {}
    for eager in (False, True):
        for enabled in (False, True):
            pdl.set_pdl(enabled)
            try:
                llm = LLM(model=model_dir, lora_modules=adapters, dtype="bfloat16", device="cuda",
                          enforce_eager=eager)
                tokens = [o.token_ids for o in llm.generate(ids, GREEDY, lora=LORAS)]
                results[eager, enabled] = (last_token_logits(llm, ids, LORAS), tokens)
            finally:
                pdl.set_pdl(True)  # the default
    for eager in (False, True):
        (logits, tokens), (pdl_logits, pdl_tokens) = results[eager, False], results[eager, True]
        assert torch.equal(pdl_logits, logits) and pdl_tokens == tokens


def test_prefix_cache_on_cuda_graphs_answers_as_without_it(tiny_models):
    """Later requests take an earlier one's prompt blocks per adapter (mixed-step graphs whose first chunk
    starts after the cached blocks) and answer token for token as an engine without the cache."""
    from test_engine import shared_prefix_prompts
    _, model_dir, adapters = tiny_models["llama"]
    first, later = shared_prefix_prompts(3, seed=44), shared_prefix_prompts(9, seed=44)[3:]
    loras = [None, "a4", "b8"]
    outs = []
    for caching in (True, False):
        llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cuda",
                  enable_prefix_caching=caching)
        outs.append([o.token_ids for o in llm.generate(first, GREEDY, lora=loras)])
        outs[-1] += [o.token_ids for o in llm.generate(later, GREEDY, lora=loras * 2)]
        assert llm.engine.blocks.hit_tokens == (6 * 32 if caching else 0)
    assert outs[0] == outs[1]


def test_kv_cache_sizing_reserves_what_the_largest_step_takes(tmp_path):
    """The engine measures the largest eager step (all max_num_batched_tokens, prompt logprobs, top-p) before
    it sizes the KV cache, and a real step of that size (an adapter, prompt logprobs, top-p) stays within what
    it keeps back (the measurement and its margin for the allocator's rounding). A 32000-token vocab so that
    the step's activations decide, not small lasting tensors."""
    from factories import make_hf_model, make_peft_adapter

    hf_model = make_hf_model("llama", vocab_size=32000, hidden_size=256, intermediate_size=512)
    hf_model.save_pretrained(tmp_path / "model")
    adapter = make_peft_adapter(hf_model, str(tmp_path / "a"), 8, 16, ["q_proj", "v_proj", "down_proj"], 7)
    llm = LLM(model=str(tmp_path / "model"), lora_modules={"a": adapter}, dtype="bfloat16", device="cuda",
              enforce_eager=True, max_num_seqs=4, max_num_batched_tokens=256)
    reserve = llm.engine.info.step_reserve_bytes
    assert reserve > 256 * 32000 * 4 * 1.25  # at least the fp32 logits of every position, with the margin
    ids = [(p * 10)[:64] for p in prompts(n=4, seed=31)]  # 4 x 64 tokens: one 256-token step
    params = SamplingParams(max_tokens=2, temperature=1.0, top_p=0.9, top_k=20, seed=0, prompt_logprobs=20)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs = llm.generate(ids, params, lora=["a", None, "a", "a"])
    assert all(len(o.prompt_logprobs) == 64 for o in outs)
    assert torch.cuda.max_memory_allocated() - base <= reserve


def test_dora_mixed_batch_equals_peft(dora_models):  # noqa: F811 (the fixture)
    """DoRA adapters beside plain ones (test_dora.py) on CUDA, Triton kernels and CUDA graphs, fp32: PEFT's tokens,
    one prompt at a time."""
    hf_model, model_dir, adapters = dora_models
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cuda", enable_dora=True)
    assert llm.engine.runner.graphs is not None
    ids = prompts(len(DORA_LORAS), seed=17)
    ours = [o.token_ids for o in llm.generate(ids, GREEDY, lora=DORA_LORAS)]
    assert ours == peft_one_by_one(peft_model(hf_model, adapters), ids, DORA_LORAS, GREEDY.max_tokens)
