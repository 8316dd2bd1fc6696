"""The whole engine on the Triton backend (interpreted on CPU, compiled on GPU) equals HF + PEFT."""

from __future__ import annotations

import pytest
from test_parity import LORAS, peft_generate, peft_model, prompts

from punica import LLM, SamplingParams


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_triton_backend_mixed_batch_equals_peft(tiny_models, family):
    hf_model, model_dir, adapters = tiny_models[family]
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cpu", backend="triton")
    assert llm.engine.info.backend == "triton"
    ids = prompts(seed=11)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(ids, params, lora=LORAS)]
    assert ours == peft_generate(peft_model(hf_model, adapters), ids, LORAS, 6)
