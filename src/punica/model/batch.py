"""The per-step Batch: everything the model needs for one forward pass, built once per step by the
runner and passed explicitly to every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from punica.ops.attention import AttentionMeta
from punica.ops.sgmv import SegmentPlan


@dataclass
class Batch:
    """Tokens of all scheduled sequences, flattened; sequences are ordered by adapter slot so that each
    adapter's tokens form one contiguous segment.

    input_ids:      [T] int64
    positions:      [T] int64 absolute position of each token in its sequence
    slot_mapping:   [T] int64 flat KV slot (block * block_size + offset) each token's K/V goes to; -1 = pad
    attn:           paged-attention metadata (per sequence)
    lora:           adapter segments (per run of tokens)
    slot_rank:      [slots] int32 rank of the adapter in each device slot (the pool's tensor)
    logits_indices: [N] int64 rows of the hidden states whose next-token logits are wanted
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    attn: AttentionMeta
    lora: SegmentPlan
    slot_rank: torch.Tensor
    logits_indices: torch.Tensor
