"""Device slots for adapters: stacked buffers per fused projection, in the layout of ops/sgmv.py.

Loading an adapter copies into an existing slot; buffers are allocated once, so captured CUDA graphs
stay valid. Slot 0 is all zeros ("no adapter").
"""

from __future__ import annotations

from typing import Protocol

import torch

from punica.lora.peft import LoRAWeights

# PEFT projection -> (fused module of the model, output slice within it)
FUSED_TARGETS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0), "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}


class LoRATarget(Protocol):
    """What the pool needs of a LoRA-aware linear layer (model/layers.py's LoRALinear)."""

    in_features: int
    out_slices: tuple[int, ...]
    slice_offsets: tuple[int, ...]
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    dora_scale: torch.Tensor | None

    def dense_weight(self, rows: slice, dtype: torch.dtype) -> torch.Tensor: ...


class AdapterPool:
    """`num_slots` adapter slots (plus slot 0) of rank up to `max_rank` for every layer's projections. With
    `dora`, each projection also gets `dora_scale` [slots, out]: 1 but where a DoRA adapter's slot holds its
    magnitude over the row norms of the adapted weight W + B*scale @ A (PEFT's DoRA, computed once per load)."""

    def __init__(self, layers: list[dict[str, LoRATarget]], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, dora: bool = False):
        self.layers = layers
        self.max_rank = max_rank
        self.slot_rank = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)
        for modules in layers:
            for m in modules.values():
                n = len(m.out_slices)
                m.lora_a = torch.zeros(num_slots + 1, n * max_rank, m.in_features, dtype=dtype, device=device)
                m.lora_b = torch.zeros(num_slots + 1, m.slice_offsets[-1], max_rank, dtype=dtype, device=device)
                m.dora_scale = (torch.ones(num_slots + 1, m.slice_offsets[-1], dtype=dtype, device=device)
                                if dora else None)

    def clear(self, slot: int) -> None:
        for modules in self.layers:
            for m in modules.values():
                m.lora_a[slot].zero_()
                m.lora_b[slot].zero_()
                if m.dora_scale is not None:
                    m.dora_scale[slot].fill_(1.0)
        self.slot_rank[slot] = 0

    def write(self, slot: int, weights: LoRAWeights) -> None:
        """Copy `weights` into `slot` (projections the adapter lacks become zeros)."""
        if slot <= 0:
            raise ValueError("slot 0 is reserved for requests without an adapter")
        self.clear(slot)
        R = self.max_rank
        for (layer, proj), (a, b) in weights.modules.items():
            fused, i = FUSED_TARGETS[proj]
            m = self.layers[layer][fused]
            r = a.shape[0]
            m.lora_a[slot, i * R:i * R + r].copy_(a, non_blocking=True)
            m.lora_b[slot, m.slice_offsets[i]:m.slice_offsets[i + 1], :r].copy_(b, non_blocking=True)
        for (layer, proj), magnitude in weights.magnitudes.items():
            fused, i = FUSED_TARGETS[proj]
            m = self.layers[layer][fused]
            if m.dora_scale is None:
                raise ValueError(f"adapter {weights.name!r} is a DoRA adapter; the pool was made without dora")
            rows = slice(m.slice_offsets[i], m.slice_offsets[i + 1])
            r = weights.modules[(layer, proj)][0].shape[0]
            a, b = m.lora_a[slot, i * R:i * R + r], m.lora_b[slot, rows, :r]  # as the kernels will read them
            norms = adapted_row_norms(m.dense_weight(rows, torch.float32), a, b)
            m.dora_scale[slot, rows] = (magnitude.to(a.device) / norms).to(m.dora_scale.dtype)
        self.slot_rank[slot] = weights.rank


def adapted_row_norms(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of W + B @ A ([out, in] + [out, r] @ [r, in]) in fp32, without forming it:
    |W_j|^2 + 2 B_j . (A W_j) + B_j (A A^T) B_j^T."""
    w, a, b = w.float(), a.float(), b.float()
    squares = w.square().sum(1) + 2 * (b * (w @ a.T)).sum(1) + ((b @ (a @ a.T)) * b).sum(1)
    return squares.clamp_min(0).sqrt()
