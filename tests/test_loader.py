"""Checkpoint variants: linear and Llama-3 rope scaling, tied embeddings, sharded safetensors, half precision."""

from __future__ import annotations

import json
import os

import pytest
import torch
from factories import make_hf_model, make_longrope_phi3

from punica import LLM, ModelLoadError, SamplingParams
from punica.config import read_model_config
from punica.ops.norm_rope import rope_attention_scale, rope_inv_freq

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    inputs = torch.tensor([ids])
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    model = make_hf_model("llama", seed=7, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True,
                          max_position_embeddings=512)
    path = str(tmp_path_factory.mktemp("llama3") / "model")
    model.save_pretrained(path, max_shard_size="40KB")
    return model, path


def test_llama3_rope_tied_sharded_matches_hf(llama3_dir):
    model, path = llama3_dir
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg.get("tie_word_embeddings") is True
    ids = [1] + list(range(10, 90))  # past original_max_position_embeddings, where llama3 scaling matters
    llm = LLM(model=path, dtype="float32", device="cpu")
    ours = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids
    assert ours == hf_greedy(model, ids, 8)


YARN_ROPES = [  # Qwen2.5's long-context setting; DeepSeek's mscale pair; an explicit attention factor, no truncation
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "mscale": 0.707,
     "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.25, "truncate": False}]


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0}, LLAMA3_ROPE, *YARN_ROPES])
def test_rope_scaling_read_from_config_matches_hf(tmp_path, scaling):
    """The inverse frequencies, and YaRN's factor on cos/sin, as transformers computes them."""
    model = make_hf_model("llama", rope_scaling=scaling, max_position_embeddings=512)
    model.save_pretrained(str(tmp_path))
    cfg = read_model_config(str(tmp_path))
    ours = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(ours, model.model.rotary_emb.inv_freq.float())
    assert rope_attention_scale(cfg.rope_scaling) == pytest.approx(model.model.rotary_emb.attention_scaling)
    if scaling["rope_type"] == "yarn":  # the context YaRN extends to
        old = scaling.get("original_max_position_embeddings", 512)
        assert cfg.max_position_embeddings == max(512, int(old * scaling["factor"]))


@pytest.mark.parametrize("scaling", YARN_ROPES[:2])
def test_yarn_scaled_model_generates_as_hf(tmp_path, scaling):
    """Past the pretraining length, where YaRN's frequencies and its attention factor both matter."""
    model = make_hf_model("qwen2", rope_scaling=scaling, max_position_embeddings=512)
    model.save_pretrained(str(tmp_path))
    ids = [(7 * i) % 128 for i in range(1, 200)]  # the tiny vocabulary's ids, past 128 and 64 positions
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu")
    ours = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids
    assert ours == hf_greedy(model, ids, 8)


def test_longrope_tables_match_hf(tmp_path):
    """Both sets of longrope frequencies (short- and long-context) and its factor on cos/sin, as transformers has
    them; factors of the wrong length are refused by name."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = make_longrope_phi3()
    model.save_pretrained(str(tmp_path))
    cfg = read_model_config(str(tmp_path))
    assert cfg.long_rope_after == 64 and cfg.max_position_embeddings == 256
    rotary = model.model.rotary_emb
    hf_long, hf_scale = ROPE_INIT_FUNCTIONS["longrope"](model.config, "cpu", seq_len=65)
    for long, ref in ((False, rotary.original_inv_freq), (True, hf_long)):
        torch.testing.assert_close(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, long), ref.float())
    assert rope_attention_scale(cfg.rope_scaling) == pytest.approx(hf_scale) and hf_scale > 1
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    rope = hf.get("rope_scaling") or hf["rope_parameters"]  # transformers 5 writes the latter
    rope["long_factor"] = rope["long_factor"][:3]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelLoadError, match="longrope.s short_factor and long_factor need rotary dims / 2 = 8"):
        read_model_config(str(tmp_path))


@pytest.mark.parametrize("prompt_len,new", [(40, 8), (100, 8), (58, 12)])
def test_longrope_model_generates_as_hf(tmp_path, prompt_len, new):
    """Within the pretraining length (short factors), a prompt past it (long factors throughout), and an output that
    crosses it (recomputed with the long factors there, as transformers' generate does); a short and a long
    request in one batch do not change each other's tokens."""
    model = make_longrope_phi3(seed=1)
    model.save_pretrained(str(tmp_path))
    ids = [(5 * i + 3) % 128 for i in range(prompt_len)]
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    expected = hf_greedy(model, ids, new)
    llm.generate([ids[:48]], params)  # its prefix in the prefix cache, rotated by the short factors: not reused
    assert llm.generate([ids], params)[0].token_ids == expected
    other = [(3 * i + 1) % 128 for i in range(130 - prompt_len)]  # long if this one is short, and the reverse
    assert llm.generate([ids, other], params)[0].token_ids == expected


def test_partial_rotary_phi3_generates_as_hf_and_serves_adapters_as_peft(tmp_path):
    """Phi-4-mini's partial rotary embedding (half of each head here): q/k rows reordered at load so the rope
    kernels rotate the right pairs and leave the rest, adapters' lora_B (and DoRA-free here) rows alike: greedy
    tokens as HF's, and a batch mixing two adapters on q/k/v and the base as PEFT's."""
    from factories import make_peaked_phi3, make_peft_adapter
    from test_parity import peft_generate, peft_model

    model = make_peaked_phi3(seed=4, partial_rotary_factor=0.5)
    model.save_pretrained(str(tmp_path / "m"))
    cfg = read_model_config(str(tmp_path / "m"))
    assert cfg.rotary_dim == 8 and cfg.head_dim == 16
    adapters = {name: make_peft_adapter(model, str(tmp_path / name), r, 2 * r, ("q_proj", "k_proj", "v_proj"), seed)
                for name, r, seed in (("x", 4, 1), ("y", 8, 2))}
    llm = LLM(model=str(tmp_path / "m"), lora_modules=adapters, dtype="float32", device="cpu")
    ids = [[(7 * i + j) % 128 for i in range(30)] for j in range(3)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert llm.generate([ids[0]], params)[0].token_ids == hf_greedy(model, ids[0], 8)
    loras = ["x", None, "y"]
    ours = [o.token_ids for o in llm.generate(ids, params, lora=loras)]
    assert ours == peft_generate(peft_model(model, adapters), ids, loras, 8)
    assert len({tuple(t) for t in ours}) == 3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_and_mostly_agrees(tiny_models, dtype):
    hf_model, model_dir, adapters = tiny_models["llama"]
    ids = [[1, 20, 30, 40, 50]] * 2
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = {}
    for dt in (dtype, "float32"):
        llm = LLM(model=model_dir, lora_modules=adapters, dtype=dt, device="cpu")
        outs[dt] = llm.generate(ids, params, lora=[None, "b8"])
    ours, ref = outs[dtype], outs["float32"]
    assert [o.token_ids[0] for o in ours] == [o.token_ids[0] for o in ref]


def test_missing_and_unsupported_models_raise(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("PUNICA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(model=str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="'.*nowhere' does not exist"):  # these said "no config.json in"
        LLM(model=str(tmp_path / "nowhere"), device="cpu")
    (tmp_path / "model.bin").write_text("")
    with pytest.raises(ModelLoadError, match="'.*model.bin' is not a directory"):
        LLM(model=str(tmp_path / "model.bin"), device="cpu")
    (tmp_path / "model.gguf").write_text("")  # a .gguf file is converted first (test_gguf_convert.py)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file '.*model.gguf'"):
        LLM(model=str(tmp_path / "model.gguf"), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*not supported"):
        LLM(model=str(tmp_path), device="cpu")


def write_config(model_dir, tiny_models, config) -> None:
    """A config.json in `model_dir`: `config` merged into the tiny llama's, or in its place where not a dict."""
    base = json.loads(open(os.path.join(tiny_models["llama"][1], "config.json")).read())
    (model_dir / "config.json").write_text(json.dumps({**base, **config} if isinstance(config, dict) else config))


@pytest.mark.parametrize("config, match", [
    ([1, 2], "config.json must hold a JSON object, got list"),
    *[({name: value}, f"{name}={value!r} in .*config.json must be a positive integer")  # not a shape mismatch later
      for name in ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                   "num_key_value_heads") for value in (0, -2)],
    ({"hidden_size": "64"}, "hidden_size='64' in .*config.json must be a positive integer"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads=3 .* must divide"),
    ({"num_attention_heads": 4, "hidden_size": 66, "head_dim": None}, "hidden_size=66 .* not a multiple"),
    # not a ValueError with a stack trace from the rope table
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "rope_scaling type 'dynamic' in .* not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'llama3' in .* lacks low_freq_factor, high_freq"),
    ({"rope_scaling": "linear"}, "rope_scaling in .* must be an object or null, got 'linear'"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": "64"}, "sliding_window='64' in .* positive integer"),
    ({"partial_rotary_factor": 0.5},
     "partial_rotary_factor=0.5 in .*: rotary embeddings over part of each head are supported for Phi3ForCausalLM"),
    ({"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0]}},
     "rope_scaling type 'longrope' in .* lacks short_factor"),
])
def test_malformed_model_configs_raise(tmp_path, tiny_models, config, match):
    write_config(tmp_path, tiny_models, config)
    with pytest.raises(ModelLoadError, match=match):
        LLM(model=str(tmp_path), device="cpu")


@pytest.mark.parametrize("config, max_len", [
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 64}, 64),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": None}, 256),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, 256),
    ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 64, "use_sliding_window": False}, 256),
    ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 64, "use_sliding_window": True}, 64),
    ({"architectures": ["LlamaForCausalLM"], "sliding_window": 64}, 256),
    ({"architectures": ["Phi3ForCausalLM"], "sliding_window": 64}, 64),  # Phi-3-mini-4k: 2047 of 4096
])
def test_a_sliding_window_caps_the_context(tmp_path, tiny_models, config, max_len):
    """Attention over a sliding window equals full attention within the window, so the context stops there
    instead of attending past it (Mistral 7B v0.1: a 4096-token window in 32768 positions)."""
    write_config(tmp_path, tiny_models, {"max_position_embeddings": 256, **config})
    assert read_model_config(str(tmp_path)).max_position_embeddings == max_len


def test_architectures_as_a_string_is_refused(tmp_path, tiny_models):
    """A string is refused, not read as a one-name list: it used to be indexed to its first letter ("architecture
    'L' is not supported"), and transformers and other HF tools would misread the same config.json, so the fix
    belongs in the file."""
    write_config(tmp_path, tiny_models, {"architectures": "LlamaForCausalLM"})
    with pytest.raises(ModelLoadError, match="architectures in .*config.json must be a list.*got 'LlamaForCausalLM'"):
        LLM(model=str(tmp_path), device="cpu")


@pytest.mark.parametrize("breakage, match", [
    ("truncated", "cannot read .*model-00001-of-.*incomplete metadata"),
    ("empty", "cannot read .*model-00001-of-.*header too small"),
    ("shard_missing", "names shards missing .*model-00002-of-"),
    ("index_not_json", "cannot read .*index.json \\(JSONDecodeError"),
    ("index_without_weight_map", "cannot read .*index.json \\(KeyError: 'weight_map'"),
])
def test_corrupt_checkpoint_files_raise(llama3_dir, tmp_path, breakage, match):
    import shutil

    path = tmp_path / "model"
    shutil.copytree(llama3_dir[1], path)
    first = sorted(path.glob("model-00001-of-*.safetensors"))[0]
    if breakage == "truncated":  # an interrupted download
        first.write_bytes(first.read_bytes()[:-10])
    elif breakage == "empty":
        first.write_bytes(b"")
    elif breakage == "shard_missing":
        next(path.glob("model-00002-of-*.safetensors")).unlink()
    elif breakage == "index_not_json":
        (path / "model.safetensors.index.json").write_text("{")
    else:
        (path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=match):
        LLM(model=str(path), dtype="float32", device="cpu")


def test_fused_projections_load_whole_or_in_parts_but_not_both(tiny_models, tmp_path):
    """A checkpoint may hold q/k/v and gate/up fused (as Phi-3's: qkv_proj, gate_up_proj): the same weights load
    to the same model either way; a checkpoint holding a projection both ways is refused by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, model_dir, _ = tiny_models["llama"]
    parts = load_file(os.path.join(model_dir, "model.safetensors"))
    fused = dict(parts)
    for prefix in sorted({k.rsplit(".", 2)[0] for k in parts if k.endswith("q_proj.weight")}):
        fused[f"{prefix}.qkv_proj.weight"] = torch.cat([fused.pop(f"{prefix}.{p}.weight") for p in ("q_proj", "k_proj",
                                                                                                  "v_proj")])
    for prefix in sorted({k.rsplit(".", 2)[0] for k in parts if k.endswith("gate_proj.weight")}):
        fused[f"{prefix}.gate_up_proj.weight"] = torch.cat([fused.pop(f"{prefix}.{p}.weight")
                                                            for p in ("gate_proj", "up_proj")])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = LLM(model=model_dir, dtype="float32", device="cpu").generate([[1, 5, 9, 30]], params)[0].token_ids
    for name, tensors in (("fused", fused), ("both", {**parts, "model.layers.1.self_attn.qkv_proj.weight":
                                                     fused["model.layers.1.self_attn.qkv_proj.weight"]})):
        out = tmp_path / name
        shutil.copytree(model_dir, out)
        save_file(tensors, str(out / "model.safetensors"))
        if name == "fused":
            assert LLM(model=str(out), dtype="float32", device="cpu").generate([[1, 5, 9, 30]], params)[0].token_ids \
                == want
        else:
            with pytest.raises(ModelLoadError, match="unexpected tensor 'model.layers.1.self_attn.qkv_proj.weight'"):
                LLM(model=str(out), dtype="float32", device="cpu")
