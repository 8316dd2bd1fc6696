"""A mixed-adapter batch equals HF + PEFT (`adapter_names=`) token for token, in fp32."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from punica import LLM, SamplingParams
from punica.engine.request import Sequence

# prompt i uses LORAS[i]: several prompts share an adapter, some use none
LORAS = ["a4", None, "b8", "c16", "a4", "d8", None, "b8"]
PROMPT_LEN = 7


def prompts(n: int = len(LORAS), seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 128, (PROMPT_LEN - 1,), generator=gen).tolist() for _ in range(n)]


def peft_model(hf_model, adapters: dict[str, str]):
    """`hf_model` (a copy: PEFT wraps its modules in place, which would change the shared fixture's for later
    tests) with `adapters` loaded."""
    import copy

    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(hf_model), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def peft_generate(model, ids: list[list[int]], loras: list[str | None], max_tokens: int,
                  **options) -> list[list[int]]:
    inputs = torch.tensor(ids)
    names = [name or "__base__" for name in loras]
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens,
                         do_sample=False, adapter_names=names, eos_token_id=None, pad_token_id=0, **options)
    return out[:, inputs.shape[1]:].tolist()


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "phi3"])
def family(request, tiny_models):
    hf_model, model_dir, adapters = tiny_models[request.param]
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cpu", backend="torch")
    return llm, peft_model(hf_model, adapters)


@pytest.mark.parametrize("first", [False, True], ids=["gemm_first", "delta_first"])
def test_mixed_batch_greedy_tokens_equal_peft(family, monkeypatch, first):
    """`first`: every step runs its LoRA first and the GEMM adds to it (layers.DELTA_FIRST_MIN_TOKENS,
    otherwise steps of more than 512 tokens); projections with a bias (qwen2's qkv) keep the GEMM first."""
    from punica.model import layers

    if first:  # the engine was built before: the `delta_first` fixture's counter would not reach its ops
        monkeypatch.setattr(layers, "DELTA_FIRST_MIN_TOKENS", 0)
    llm, peft = family
    ids = prompts()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(ids, params, lora=LORAS)]
    assert ours == peft_generate(peft, ids, LORAS, 12)
    assert all(o.finish_reason == "length" for o in llm.generate(ids[:2], params, lora=LORAS[:2]))


def test_repetition_penalty_equals_peft(family):
    """transformers' repetition_penalty (over prompt and generated ids) in a mixed-adapter greedy batch."""
    llm, peft = family
    ids = prompts(seed=3)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.8)
    ours = [o.token_ids for o in llm.generate(ids, params, lora=LORAS)]
    assert ours == peft_generate(peft, ids, LORAS, 12, repetition_penalty=1.8)
    assert ours != [o.token_ids for o in llm.generate(ids, dataclasses.replace(params, repetition_penalty=1.0),
                                                      lora=LORAS)]


def test_adapters_change_the_output(family):
    llm, _ = family
    ids = [prompts(1)[0]] * 5
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = [tuple(o.token_ids) for o in llm.generate(ids, params, lora=[None, "a4", "b8", "c16", "d8"])]
    assert len(set(outs)) == 5, "every adapter (and the base) should answer differently"


def last_token_logits(llm: LLM, ids: list[list[int]], loras: list[str | None]) -> torch.Tensor:
    """Our model's next-token logits after each prompt, all prompts in one batch."""
    engine = llm.engine
    seqs = []
    for i, (prompt, name) in enumerate(zip(ids, loras)):
        seq = Sequence(request_id=f"logits-{i}", prompt_ids=prompt, params=SamplingParams(), lora=name)
        engine.blocks.grow(seq.block_table, len(prompt))
        seq.slot = engine.adapters.acquire(name) if name else 0
        seqs.append(seq)
    try:
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].slot)
        batch = engine.runner.build_batch([(seqs[i], len(seqs[i].tokens)) for i in order])
        logits = engine.model(batch)
        return logits[torch.argsort(torch.tensor(order))]
    finally:
        for seq in seqs:
            engine.blocks.free(seq.block_table)
            if seq.lora:
                engine.adapters.release(seq.lora)


def test_mixed_batch_logits_close_to_peft(family):
    llm, peft = family
    ids = prompts(seed=1)
    inputs = torch.tensor(ids)
    with torch.no_grad():
        expected = peft(input_ids=inputs, adapter_names=[n or "__base__" for n in LORAS]).logits[:, -1]
    torch.testing.assert_close(last_token_logits(llm, ids, LORAS), expected, rtol=1e-4, atol=1e-4)


def test_logprobs_equal_peft_log_softmax(family):
    """Each generated token's logprob and the top 5 are log_softmax of PEFT's logits at that step, in a mixed
    batch; the request that asked for none gets none."""
    llm, peft = family
    ids = prompts(seed=5)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = llm.engine.add_requests(ids, [params] * (len(ids) - 1) + [dataclasses.replace(params, logprobs=None)],
                                   LORAS)
    done = {}
    while llm.engine.has_unfinished():
        done.update({o.request_id: o for o in llm.engine.step() if o.finished})
    ours = [done[rid] for rid in outs]
    inputs = torch.tensor(ids)
    with torch.no_grad():
        hf = peft.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=6,
                           do_sample=False, adapter_names=[n or "__base__" for n in LORAS], eos_token_id=None,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    expected = torch.stack(hf.logits, 1).float().log_softmax(-1)  # [prompts, steps, vocab]
    assert ours[-1].logprobs is None
    for i, out in enumerate(ours[:-1]):
        assert [lp.token_id for lp in out.logprobs] == out.token_ids == hf.sequences[i, inputs.shape[1]:].tolist()
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        torch.testing.assert_close(got, expected[i].gather(1, torch.tensor(out.token_ids)[:, None])[:, 0],
                                   rtol=1e-4, atol=1e-4)
        top = expected[i].topk(5, dim=-1)
        assert [[t for t, _ in lp.top] for lp in out.logprobs] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([[v for _, v in lp.top] for lp in out.logprobs]), top.values,
                                   rtol=1e-4, atol=1e-4)


def test_prompt_logprobs_equal_peft_log_softmax(family, tiny_models):
    """Each prompt token's logprob given those before it, and the top 3, equal log_softmax of PEFT's logits
    over the prompt, mixed adapters in one batch; also with the prompt computed in chunks of 3 tokens."""
    llm, peft = family
    ids = prompts(seed=6)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    inputs = torch.tensor(ids)
    with torch.no_grad():
        logits = peft(input_ids=inputs, adapter_names=[n or "__base__" for n in LORAS]).logits.float()
    expected = logits.log_softmax(-1)[:, :-1]  # position p predicts token p + 1
    chunked = LLM(model=llm.engine.config.model, lora_modules=llm.engine.list_loras(), dtype="float32", device="cpu",
                  backend="torch", max_num_batched_tokens=8, max_num_seqs=8)
    for engine_llm in (llm, chunked):
        outs = engine_llm.generate(ids, params, lora=LORAS)
        for i, out in enumerate(outs):
            lps = out.prompt_logprobs
            assert len(lps) == PROMPT_LEN and lps[0].token_id == ids[i][0] and lps[0].logprob is None
            assert [lp.token_id for lp in lps] == ids[i] and out.logprobs is None
            want = expected[i].gather(1, torch.tensor(ids[i][1:])[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor([lp.logprob for lp in lps[1:]]), want, rtol=1e-4, atol=1e-4)
            top = expected[i].topk(3, dim=-1)
            assert [[t for t, _ in lp.top] for lp in lps[1:]] == top.indices.tolist()


def test_request_alone_equals_request_in_full_batch(family):
    llm, _ = family
    ids = prompts(seed=2)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    batched = llm.generate(ids, params, lora=LORAS)
    for i in (0, 3, 6):
        alone = llm.generate([ids[i]], params, lora=[LORAS[i]])[0]
        assert alone.token_ids == batched[i].token_ids


def test_all_linear_and_regex_target_modules(tiny_models, tmp_path):
    """PEFT's "all-linear" and a regex string for target_modules: the weights decide, as in PEFT."""
    from factories import make_peft_adapter

    hf_model, model_dir, _ = tiny_models["llama"]
    adapters = {"all": make_peft_adapter(hf_model, str(tmp_path / "all"), 4, 8, "all-linear", 7),
                "rx": make_peft_adapter(hf_model, str(tmp_path / "rx"), 4, 8, r".*\.(q|v)_proj", 8)}
    llm = LLM(model=model_dir, lora_modules=adapters, device="cpu")
    ids, loras = prompts(3, seed=9), ["all", None, "rx"]
    ours = [o.token_ids for o in llm.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                                lora=loras)]
    assert ours == peft_generate(peft_model(hf_model, adapters), ids, loras, 8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bias", [False, True])
def test_delta_first_projection_equals_gemm_then_lora(monkeypatch, backend, bias):
    """A LoRALinear over more than DELTA_FIRST_MIN_TOKENS tokens writes its delta over an empty y and lets the
    GEMM add to it (ops.linear_add); with a bias it adds the LoRA after the GEMM. Either way y = x @ W.T (+ b) +
    each token's delta, base-model tokens included (they get the GEMM alone)."""
    from types import SimpleNamespace

    from punica.lora.plan import build_segment_plan
    from punica.model import layers
    from punica.ops import select_ops, sgmv

    if backend == "triton" and not sgmv._INTERPRETED:
        pytest.skip("the CPU tier runs Triton in its interpreter")
    calls = []
    ops = select_ops(backend)
    linear_add = ops.linear_add
    ops = dataclasses.replace(ops, linear_add=lambda *a: (calls.append(1), linear_add(*a))[1])
    gen = torch.Generator().manual_seed(5)
    layer = layers.LoRALinear(ops, 32, (24, 8), bias=bias)
    layer.weight.copy_(torch.randn(32, 32, generator=gen))
    if bias:
        layer.bias.copy_(torch.randn(32, generator=gen))
    layer.lora_a = torch.randn(3, 2 * 8, 32, generator=gen)
    layer.lora_b = torch.randn(3, 32, 8, generator=gen)
    layer.lora_a[0] = 0
    layer.lora_b[0] = 0
    slot_rank = torch.tensor([0, 8, 4], dtype=torch.int32)
    layer.lora_a[2, 4:8] = layer.lora_a[2, 12:] = 0  # rank 4: rows past it are zero padding
    layer.lora_b[2, :, 4:] = 0
    batch = SimpleNamespace(lora=build_segment_plan([0, 1, 2], [3, 7, 5], "cpu"), slot_rank=slot_rank)
    x = torch.randn(15, 32, generator=gen)
    token_slot = [0] * 3 + [1] * 7 + [2] * 5
    a, b = layer.lora_a[token_slot], layer.lora_b[token_slot]
    delta = torch.cat([torch.einsum("ti,tri,tor->to", x, a[:, i * 8:(i + 1) * 8], b[:, o0:o1])
                       for i, (o0, o1) in enumerate([(0, 24), (24, 32)])], dim=1)
    expected = x @ layer.weight.T + (layer.bias if bias else 0) + delta
    monkeypatch.setattr(layers, "DELTA_FIRST_MIN_TOKENS", 14)
    torch.testing.assert_close(layer(x, batch), expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == (0 if bias else 1)
    monkeypatch.setattr(layers, "DELTA_FIRST_MIN_TOKENS", 15)  # 15 tokens: not more than it, the GEMM first
    torch.testing.assert_close(layer(x, batch), expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == (0 if bias else 1)
