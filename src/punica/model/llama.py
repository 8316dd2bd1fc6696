"""The LLaMA family (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache, with per-token LoRA adapters.

Projections are fused (qkv, gate_up); each applies one adapter per output slice. The model never
branches on the adapter: a token without one sits in a slot-0 segment that the LoRA op skips.
"""

from __future__ import annotations

import torch
from torch import nn

from punica.config import ModelConfig
from punica.model.batch import Batch
from punica.model.layers import LoRALinear, RMSNorm
from punica.ops import Ops
from punica.ops.norm_rope import rope_table

# Kernel fusions the model uses (benchmarks A/B them with --unfused): "rope_store_kv" rotates q, k and writes
# k, v to the KV pool in one launch; "qk_norm" (with it) normalizes q's and k's heads there first where the model
# has q/k norms (Qwen3); "fold_delta" adds a LoRA delta computed beside its projection's GEMM in the next kernel
# instead of an add of its own: qkv's in rope_store_kv, gate_up's in silu_and_mul, o's and down's in the
# add_rms_norm after them.
FUSIONS = {"rope_store_kv": True, "qk_norm": True, "fold_delta": True}


class Attention(nn.Module):
    def __init__(self, ops: Ops, cfg: ModelConfig, cos_sin: torch.Tensor):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = LoRALinear(ops, cfg.hidden_size, (cfg.q_size, cfg.kv_size, cfg.kv_size), cfg.qkv_bias)
        self.o_proj = LoRALinear(ops, cfg.q_size, (cfg.hidden_size,))
        if cfg.qk_norm:  # Qwen3: each head of q and k is RMS-normalized (its own weights) before RoPE
            self.q_norm = RMSNorm(ops, cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(ops, cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.cos_sin = cos_sin
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views q [T, Hq, D], k, v [T, Hkv, D] of a fused [T, (Hq + 2 Hkv) D] projection output."""
        q, k, v = qkv.split(self.qkv_proj.out_slices, dim=-1)
        T = qkv.shape[0]
        return (q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim),
                v.view(T, self.num_kv_heads, self.head_dim))

    def forward(self, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """o_proj's output and its LoRA delta still to add (None when added)."""
        T = x.shape[0]
        norms_in_rope = self.qk_norm and FUSIONS["rope_store_kv"] and FUSIONS["qk_norm"]
        norms_apart = self.qk_norm and not norms_in_rope  # they need q and k with the delta added
        fold = FUSIONS["fold_delta"] and FUSIONS["rope_store_kv"] and not norms_apart
        qkv, delta = _deferred(self.qkv_proj, x, batch, fold)
        q, k, v = self.heads(qkv)
        if norms_apart:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        if FUSIONS["rope_store_kv"]:
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if norms_in_rope else None
            q = self.ops.rope_store_kv(q, k, v, batch.positions, self.cos_sin, self.k_cache, self.v_cache,
                                       batch.slot_mapping, None if delta is None else self.heads(delta), norms)
        else:
            q, k = self.ops.apply_rope(q, k, batch.positions, self.cos_sin)
            self.ops.store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping)
        out = self.ops.paged_attention(q, self.k_cache, self.v_cache, batch.attn, self.scale)
        return _deferred(self.o_proj, out.reshape(T, -1), batch, FUSIONS["fold_delta"])


class MLP(nn.Module):
    def __init__(self, ops: Ops, cfg: ModelConfig):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = LoRALinear(ops, cfg.hidden_size, (cfg.intermediate_size, cfg.intermediate_size))
        self.down_proj = LoRALinear(ops, cfg.intermediate_size, (cfg.hidden_size,))

    def forward(self, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """down_proj's output and its LoRA delta still to add (None when added)."""
        gate_up, delta = _deferred(self.gate_up_proj, x, batch, FUSIONS["fold_delta"])
        return _deferred(self.down_proj, self.ops.silu_and_mul(gate_up, delta), batch, FUSIONS["fold_delta"])


def _deferred(proj: LoRALinear, x: torch.Tensor, batch: Batch, fold: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """proj's output and the LoRA delta still to add to it: None unless `fold` (the next kernel adds it)."""
    y, delta = proj.forward_deferred(x, batch)
    if delta is not None and not fold:
        return y.add_(delta), None
    return y, delta


class DecoderLayer(nn.Module):
    def __init__(self, ops: Ops, cfg: ModelConfig, cos_sin: torch.Tensor):
        super().__init__()
        self.input_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(ops, cfg, cos_sin)
        self.post_attention_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(ops, cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: Batch,
                delta: torch.Tensor | None = None):
        """(x, residual, delta): the layer's output is x + delta (delta None when added), the residual
        stream before it `residual`; `delta` in is the previous layer's."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual, delta)
        x, delta = self.self_attn(x, batch)
        x, residual = self.post_attention_layernorm(x, residual, delta)
        x, delta = self.mlp(x, batch)
        return x, residual, delta


class LlamaModel(nn.Module):
    """Parameters are named as in HF checkpoints, except the fused qkv_proj and gate_up_proj."""

    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.config = cfg
        self.ops = ops
        self.register_buffer("cos_sin", self._rope_table(), persistent=False)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(ops, cfg, self.cos_sin) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _rope_table(self) -> torch.Tensor:
        cfg = self.config
        return rope_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, cfg.rotary_dim)

    def after_materialize(self) -> None:
        """After `to_empty`: re-tie the embeddings and recompute the rope table on the model's device."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.cos_sin = self._rope_table().to(self.cos_sin.device)
        for layer in self.layers:
            layer.self_attn.cos_sin = self.cos_sin

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.cos_sin.dtype != torch.float32:  # the rope table stays fp32 whatever the model's dtype
            self.cos_sin = self._rope_table().to(self.cos_sin.device)
        for layer in self.layers:  # the rope table is shared by all layers and must follow the model's device
            layer.self_attn.cos_sin = self.cos_sin
        return self

    def bind_kv_cache(self, kv: torch.Tensor | None) -> None:
        """Attach the KV pool [num_layers, 2, num_blocks, block_size, Hkv, D] to the attention layers (None:
        detach it, so its memory can be freed)."""
        for i, layer in enumerate(self.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = (None, None) if kv is None else (kv[i, 0], kv[i, 1])

    def overlap_lora(self, mode: str | dict[str, str], priority: int = 0) -> None:
        """What of each projection's LoRA runs on a second CUDA stream, concurrently with its base GEMM (also
        inside CUDA graphs, where the two become parallel branches): "auto", "delta", "shrink" or "none" (see
        EngineConfig.lora_overlap), or a mode per fused projection name ("o_proj": "shrink", ...; others
        "delta"). `priority` < 0 makes it a higher-priority stream, whose kernels the GPU schedules before
        the GEMM's pending blocks (graphs keep captured node priorities). Graphs captured before this call
        keep the old arrangement until recaptured."""
        if mode == "auto":
            mode = "delta"
        names = list(self.lora_modules(0))
        given = mode if isinstance(mode, dict) else dict.fromkeys(names, mode)
        modes = {name: given.get(name, "delta") for name in names}
        bad = sorted(set(given) - set(names)) + sorted(set(modes.values()) - {"none", "delta", "shrink"})
        if bad:
            raise ValueError(f"LoRA overlap: 'auto', or 'none', 'delta' or 'shrink' for {names}, got {mode!r}")
        stream = None
        if set(modes.values()) != {"none"}:
            stream = torch.cuda.Stream(self.embed_tokens.weight.device, priority=priority)
        for i in range(len(self.layers)):
            for name, module in self.lora_modules(i).items():
                module.overlap = modes[name]
                module.side_stream = None if modes[name] == "none" else stream

    def lora_modules(self, layer: int) -> dict[str, LoRALinear]:
        """The four LoRA-aware linear layers of decoder layer `layer`, by fused name."""
        blk = self.layers[layer]
        return {"qkv_proj": blk.self_attn.qkv_proj, "o_proj": blk.self_attn.o_proj,
                "gate_up_proj": blk.mlp.gate_up_proj, "down_proj": blk.mlp.down_proj}

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Next-token logits [N, vocab] (fp32) at batch.logits_indices."""
        x, residual, delta = self.embed_tokens(batch.input_ids), None, None
        for layer in self.layers:
            x, residual, delta = layer(x, residual, batch, delta)
        x = (x if delta is None else x + delta) + residual
        x = x.index_select(0, batch.logits_indices)
        return self.lm_head(self.norm(x)).float()
