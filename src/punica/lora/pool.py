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


class AdapterPool:
    """`num_slots` adapter slots (plus slot 0) of rank up to `max_rank` for every layer's projections."""

    def __init__(self, layers: list[dict[str, LoRATarget]], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        self.layers = layers
        self.max_rank = max_rank
        self.slot_rank = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)
        for modules in layers:
            for m in modules.values():
                n = len(m.out_slices)
                m.lora_a = torch.zeros(num_slots + 1, n * max_rank, m.in_features, dtype=dtype, device=device)
                m.lora_b = torch.zeros(num_slots + 1, m.slice_offsets[-1], max_rank, dtype=dtype, device=device)

    def clear(self, slot: int) -> None:
        for modules in self.layers:
            for m in modules.values():
                m.lora_a[slot].zero_()
                m.lora_b[slot].zero_()
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
        self.slot_rank[slot] = weights.rank
