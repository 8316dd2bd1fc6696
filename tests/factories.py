"""Tiny random HF checkpoints, PEFT adapters and tokenizers, made by the tests themselves (no downloads)."""

from __future__ import annotations

import os

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
# Phi-3's checkpoints fuse q/k/v and gate/up: adapters target the fused modules
PHI3_TARGETS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                "up_proj": "gate_up_proj"}


def make_hf_model(family: str, seed: int = 0, **overrides):
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if family == "llama":
        common.setdefault("rope_scaling", None)
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":  # per-head q/k norms; head_dim apart from hidden_size / heads, as in Qwen3's checkpoints
        common.setdefault("head_dim", 32)
        cfg = transformers.Qwen3Config(**common)
        cls = transformers.Qwen3ForCausalLM
    elif family == "phi3":  # fused qkv_proj and gate_up_proj weights (and adapters)
        cfg = transformers.Phi3Config(pad_token_id=0, **common)
        cls = transformers.Phi3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF's init leaves biases at zero; randomize so the qkv bias is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # HF's ones would hide a norm not applied
                p.uniform_(0.5, 1.5)
    return model


def make_peaked_phi3(seed: int = 0, **overrides):
    """A tiny Phi-3 whose q and k are 30x HF's init, so attention is peaked enough that the rotations decide the
    tokens (with HF's init a rope error can leave greedy tokens unchanged)."""
    model = make_hf_model("phi3", seed=seed, **overrides)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight[:(cfg.num_attention_heads + cfg.num_key_value_heads) * head_dim] *= 30
    return model


def make_longrope_phi3(seed: int = 0, **overrides):
    """A peaked tiny Phi-3 (make_peaked_phi3) with longrope scaling (as Phi-3.5 and Phi-3 128k): pretrained on 64
    positions, 256 in all."""
    gen = torch.Generator().manual_seed(seed)
    short, long = (torch.empty(8).uniform_(lo, hi, generator=gen).tolist() for lo, hi in ((1.0, 1.5), (2.0, 6.0)))
    return make_peaked_phi3(seed, original_max_position_embeddings=64, max_position_embeddings=256,
                            rope_scaling={"rope_type": "longrope", "short_factor": short, "long_factor": long},
                            **overrides)


def make_peft_adapter(base, out_dir: str, r: int, alpha: float, targets, seed: int, use_rslora=False,
                      rank_pattern=None, alpha_pattern=None, as_bin: bool = False, use_dora: bool = False) -> str:
    """A PEFT LoRA with random (non-zero) B, saved to `out_dir`; `use_dora`: DoRA, its magnitudes moved off
    their initial values too."""
    import copy

    from peft import LoraConfig, get_peft_model

    if base.config.model_type == "phi3":  # the fused modules stand for their parts
        targets = targets if isinstance(targets, str) else sorted({PHI3_TARGETS.get(t, t) for t in targets})
        rank_pattern, alpha_pattern = ({PHI3_TARGETS.get(k, k): v for k, v in (p or {}).items()}
                                       for p in (rank_pattern, alpha_pattern))
    targets = targets if isinstance(targets, str) else list(targets)  # a string: "all-linear" or a regex
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, lora_dropout=0.0,
                     use_dora=use_dora)
    model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:  # DoRA: PEFT starts it at |W|'s rows; move it off them
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(out_dir, safe_serialization=not as_bin)
    return out_dir


ADAPTER_SPECS = {
    # name: (r, alpha, targets, extra)
    "a4": (4, 8, ("q_proj", "v_proj"), {}),
    "b8": (8, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), {}),
    "c16": (16, 8, ("o_proj", "down_proj", "up_proj"), {"use_rslora": True}),
    "d8": (8, 32, ("k_proj", "gate_proj"), {"as_bin": True, "rank_pattern": {"gate_proj": 4},
                                              "alpha_pattern": {"k_proj": 4}}),
}


def write_word_tokenizer(model_dir: str, vocab_size: int = 128) -> list[str]:
    """A word-level tokenizer.json over words w3..w{vocab-1} (0 unk, 1 bos, 2 eos); returns the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    return words
