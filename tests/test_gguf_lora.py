"""llama.cpp LoRA files (.gguf) served as adapters: written here as llama.cpp's convert_lora_to_gguf.py writes
them from the tests' PEFT adapters, they must load to the very weights of the PEFT directories and serve alike."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_gguf_convert import GGUF_LAYER_NAMES, llama_cpp_permute

from punica import LLM, SamplingParams
from punica.config import read_model_config
from punica.errors import AdapterError
from punica.lora.peft import load_peft_adapter, load_tensors

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PUNICA_CACHE", str(tmp_path / "cache"))


def write_lora_gguf(path: str, model, peft_dir: str, arch: str, extra: dict | None = None) -> str:
    """The PEFT adapter at `peft_dir` as llama.cpp writes it: `blk.N.<tensor>.weight.lora_a` / `.lora_b`, one alpha,
    the base model's hyperparameters, and for llama B's q/k rows permuted as the base q/k weights are."""
    from gguf import GGUFWriter

    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        alpha = json.load(f)["lora_alpha"]
    cfg = model.config
    w = GGUFWriter(path, arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads} if arch == "llama" else {}
    for key, t in sorted({**load_tensors(peft_dir), **(extra or {})}.items()):
        module, half = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        if module.startswith("model.layers."):
            layer, rest = module.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}"
        else:
            name = {"model.embed_tokens": "token_embd"}[module]
        t = t.float().numpy()
        if half.startswith("B") and name.split(".")[-1] in heads:
            t = llama_cpp_permute(t, heads[name.split(".")[-1]])
        w.add_tensor(f"{name}.weight.lora_{half[0].lower()}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family,arch", [("llama", "llama"), ("qwen2", "qwen2"), ("phi3", "phi3")])
def test_a_lora_gguf_serves_as_its_peft_directory(tiny_models, tmp_path, family, arch):
    """Each adapter (uniform rank, a rank_pattern) loads from its .gguf to the PEFT directory's scaled weights
    exactly, and a batch mixing the two forms generates the same tokens for each."""
    from factories import make_peft_adapter

    hf_model, model_dir, adapters = tiny_models[family]
    peft = {"a4": adapters["a4"], "b8": adapters["b8"],
            "ranks": make_peft_adapter(hf_model, str(tmp_path / "ranks"), 8, 16, ("q_proj", "k_proj", "gate_proj"), 7,
                                       rank_pattern={"gate_proj": 4, "k_proj": 2})}
    files = {f"{name}.gguf": write_lora_gguf(str(tmp_path / f"{name}.gguf"), hf_model, path, arch)
             for name, path in peft.items()}
    model_cfg = read_model_config(model_dir)
    for name, path in peft.items():
        file = files[f"{name}.gguf"]
        ours, ref = load_peft_adapter(name, file, model_cfg, 16), load_peft_adapter(name, path, model_cfg, 16)
        assert ours.path == file and ours.rank == ref.rank and ours.modules.keys() == ref.modules.keys()
        for key, (a, b) in ref.modules.items():
            assert torch.equal(ours.modules[key][0], a) and torch.equal(ours.modules[key][1], b), (name, key)
    llm = LLM(model=model_dir, lora_modules={**peft, **files}, dtype="float32", device="cpu")
    ids = [[5, 9, 14, 3, 77, 21]] * 6
    outs = llm.generate(ids, GREEDY, lora=["a4", "a4.gguf", "b8", "b8.gguf", "ranks", "ranks.gguf"])
    assert [o.token_ids for o in outs[::2]] == [o.token_ids for o in outs[1::2]]
    assert len({tuple(o.token_ids) for o in outs[::2]}) > 1  # the adapters differ from each other


def test_a_lora_gguf_is_converted_once(tiny_models, tmp_path, monkeypatch):
    hf_model, model_dir, adapters = tiny_models["llama"]
    path = write_lora_gguf(str(tmp_path / "b8.gguf"), hf_model, adapters["b8"], "llama")
    model_cfg = read_model_config(model_dir)
    first = load_peft_adapter("b8", path, model_cfg, 16)
    monkeypatch.setattr("punica.lora.gguf_lora.convert_gguf_adapter", lambda *a, **k: pytest.fail("reconverted"))
    again = load_peft_adapter("b8", path, model_cfg, 16)
    assert all(torch.equal(again.modules[k][1], b) for k, (_, b) in first.modules.items())


def test_punica_convert_writes_a_lora_gguf_as_a_peft_directory(tiny_models, tmp_path):
    from punica.lora.convert import convert_adapter

    hf_model, model_dir, adapters = tiny_models["llama"]
    path = write_lora_gguf(str(tmp_path / "b8.gguf"), hf_model, adapters["b8"], "llama")
    done = convert_adapter(path, model_dir)
    assert done.out_dir == str(tmp_path / "b8") and os.path.isfile(tmp_path / "b8" / "adapter_config.json")
    model_cfg = read_model_config(model_dir)
    ours, ref = (load_peft_adapter("b8", p, model_cfg, 16) for p in (done.out_dir, adapters["b8"]))
    assert all(torch.equal(ours.modules[k][1], b) for k, (_, b) in ref.modules.items())


def test_what_is_not_a_servable_lora_gguf_is_named(tiny_models, tmp_path):
    from test_gguf_convert import demo_vocab, write_gguf

    from punica import demo_model

    hf_model, model_dir, adapters = tiny_models["llama"]
    model_cfg = read_model_config(model_dir)
    base = str(tmp_path / "base.gguf")
    write_gguf(base, hf_model, "llama", demo_vocab(demo_model.find_demo_gguf(), "smollm"))
    with pytest.raises(AdapterError, match=r"is not a llama.cpp LoRA adapter \(general.type=None.*served with --model"):
        load_peft_adapter("x", base, model_cfg, 16)
    embed = {"base_model.model.model.embed_tokens.lora_A.weight": torch.ones(4, 128),
             "base_model.model.model.embed_tokens.lora_B.weight": torch.ones(64, 4)}
    path = write_lora_gguf(str(tmp_path / "embed.gguf"), hf_model, adapters["a4"], "llama", embed)
    with pytest.raises(AdapterError, match="token_embd.weight is not one of the seven projections"):
        load_peft_adapter("x", path, model_cfg, 16)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03")
    with pytest.raises(AdapterError, match="cannot read GGUF file"):
        load_peft_adapter("x", str(tmp_path / "broken.gguf"), model_cfg, 16)
