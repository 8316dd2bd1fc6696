"""DoRA adapters (`enable_dora`): each projection's output, per token, is its adapter's magnitude over the row norms
of the adapted weight times (x @ W.T + LoRA delta), plus the bias. PEFT itself refuses DoRA in mixed-adapter batches
(`adapter_names`), so the reference is PEFT one prompt at a time, with that prompt's adapter set."""

from __future__ import annotations

import os

import pytest
import torch
from factories import make_hf_model, make_peft_adapter
from test_parity import peft_model, prompts

from punica import LLM, SamplingParams
from punica.errors import AdapterError
from punica.lora.pool import adapted_row_norms

DORA_SPECS = {  # name: (r, alpha, targets, DoRA)
    "dora4": (4, 8, ("q_proj", "v_proj", "o_proj", "down_proj"), True),
    "dora8": (8, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), True),
    "plain": (4, 8, ("q_proj", "up_proj"), False),
}
LORAS = ["dora4", None, "plain", "dora8", "dora4", "dora8"]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2", "phi3"])  # qwen2: the qkv bias stays outside the scaling;
# phi3: adapters on fused qkv_proj / gate_up_proj, their magnitudes split with lora_B
def dora_models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"dora-{request.param}")
    model = make_hf_model(request.param, seed=3)
    model_dir = os.path.join(root, "model")
    model.save_pretrained(model_dir)
    adapters = {name: make_peft_adapter(model, os.path.join(root, name), r, alpha, targets, 50 + i, use_dora=dora)
                for i, (name, (r, alpha, targets, dora)) in enumerate(DORA_SPECS.items())}
    return model, model_dir, adapters


def peft_one_by_one(model, ids: list[list[int]], loras: list[str | None], max_tokens: int) -> list[list[int]]:
    out = []
    for prompt, name in zip(ids, loras):
        inputs = torch.tensor([prompt])
        kwargs = dict(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
        if name is None:
            with model.disable_adapter():
                out.append(model.generate(**kwargs)[0, len(prompt):].tolist())
        else:
            model.set_adapter(name)
            out.append(model.generate(**kwargs)[0, len(prompt):].tolist())
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_mixed_batch_with_dora_adapters_equals_peft(dora_models, backend):
    hf_model, model_dir, adapters = dora_models
    llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", device="cpu", backend=backend,
              enable_dora=True)
    ids = prompts(len(LORAS), seed=13)
    ours = [o.token_ids for o in llm.generate(ids, GREEDY, lora=LORAS)]
    expected = peft_one_by_one(peft_model(hf_model, adapters), ids, LORAS, GREEDY.max_tokens)
    assert ours == expected
    plain = LLM(model=model_dir, lora_modules={"plain": adapters["plain"]}, dtype="float32", device="cpu",
                backend=backend)  # without DoRA's scaling, the same plain-LoRA and base replies
    keep = [i for i, name in enumerate(LORAS) if name in (None, "plain")]
    assert [o.token_ids for o in plain.generate([ids[i] for i in keep], GREEDY, lora=[LORAS[i] for i in keep])] \
        == [ours[i] for i in keep]


def test_dora_adapters_are_refused_unless_enabled(dora_models):
    _, model_dir, adapters = dora_models
    llm = LLM(model=model_dir, dtype="float32", device="cpu")
    with pytest.raises(AdapterError, match="use_dora=True is not supported .*--enable-dora"):
        llm.add_lora("dora4", adapters["dora4"])


def test_adapted_row_norms_equal_the_formed_matrix():
    gen = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*shape, generator=gen) for shape in ((24, 40), (5, 40), (24, 5)))
    torch.testing.assert_close(adapted_row_norms(w, a, b), torch.linalg.norm(w + b @ a, dim=1))
