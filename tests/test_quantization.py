"""quantization "fp8": the decoder layers' projection weights stored as float8 e4m3 with one scale per output row.

The reference is the same model with those weights replaced by their dequantized values (q * scale, in fp32): HF +
PEFT generate from it, mixed adapters in one batch, and our fp8 engine must agree with it, while differing from the
unquantized model. The kernel itself is tested in tests/ops/test_gemm.py; on CUDA in test_gpu_engine.py."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import make_hf_model, make_peft_adapter
from test_engine import logprob_rows
from test_parity import LORAS, peft_generate, peft_model, prompts

from punica import LLM, SamplingParams
from punica.config import EngineConfig
from punica.errors import ConfigError
from punica.ops.gemm import dequantize_rows, quantize_rows_fp8

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SCORED = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, prompt_logprobs=1)
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
               "down_proj"}


def dequantized(hf_model):
    """A copy of `hf_model` whose decoder projections hold what quantization "fp8" stores: each row rounded to
    float8 under its own scale, multiplied back."""
    out = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, module in out.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS and ".layers." in f".{name}":
                module.weight.copy_(dequantize_rows(*quantize_rows_fp8(module.weight), module.weight.dtype))
    return out


def save(hf_model, path) -> str:
    hf_model.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("family", ["llama", "phi3"])  # phi3: fused qkv_proj / gate_up_proj in the checkpoint
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_weights_generate_as_peft_on_the_dequantized_model(tiny_models, tmp_path, family, backend):
    """A mixed-adapter batch on fp8 weights gives PEFT's tokens on the dequantized model, and the logprobs of an
    unquantized engine loading the dequantized checkpoint (to fp32 rounding); they differ from the original
    model's. The projections hold a quarter of an fp32 model's weight bytes (plus a scale per row)."""
    hf_model, model_dir, adapters = tiny_models[family]
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cpu", backend=backend,
              quantization="fp8")
    assert llm.engine.info.quantization == "fp8"
    for module in llm.engine.model.lora_modules(0).values():
        assert module.weight.dtype == torch.float8_e4m3fn and module.weight_scale.shape == (module.weight.shape[0],)
    assert llm.engine.model.lm_head.weight.dtype == torch.float32  # embeddings and the LM head are kept
    ids = prompts(seed=41)
    ours = [o.token_ids for o in llm.generate(ids, GREEDY, lora=LORAS)]
    reference = dequantized(hf_model)
    assert ours == peft_generate(peft_model(reference, adapters), ids, LORAS, 10)

    scored = llm.generate(ids, SCORED, lora=LORAS)
    plain = LLM(model=save(reference, tmp_path / "dequantized"), lora_modules=adapters, dtype="float32", device="cpu")
    expected = plain.generate(ids, SCORED, lora=LORAS)
    original = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cpu").generate(ids, SCORED,
                                                                                                   lora=LORAS)
    for mine, same, unquantized in zip(scored, expected, original):
        assert logprob_rows(mine) == pytest.approx(logprob_rows(same), abs=1e-4)
        assert logprob_rows(mine) != pytest.approx(logprob_rows(unquantized), abs=1e-4)


def test_fp8_weights_with_dora_adapters(tmp_path):
    """DoRA's magnitudes divide by the row norms of the adapted weight: with fp8 weights, of the dequantized one.
    PEFT one prompt at a time on the dequantized model is the reference (it refuses DoRA in mixed batches)."""
    from test_dora import peft_one_by_one

    hf_model = make_hf_model("llama", seed=5)
    model_dir = save(hf_model, tmp_path / "model")
    adapters = {"dora": make_peft_adapter(hf_model, str(tmp_path / "dora"), 8, 16, ("q_proj", "v_proj", "down_proj"),
                                          60, use_dora=True)}
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cpu", enable_dora=True,
              quantization="fp8")
    ids, loras = prompts(3, seed=43), ["dora", None, "dora"]
    ours = [o.token_ids for o in llm.generate(ids, GREEDY, lora=loras)]
    reference = peft_model(dequantized(hf_model), adapters)
    assert ours == peft_one_by_one(reference, ids, loras, 10)


def test_an_unknown_quantization_is_named(tiny_models):
    with pytest.raises(ConfigError, match=r"quantization must be one of \('none', 'fp8'\), got 'int4'"):
        EngineConfig(quantization="int4")
    with pytest.raises(ConfigError, match="quantization must be one of"):
        LLM(model=tiny_models["llama"][1], device="cpu", quantization="awq")
