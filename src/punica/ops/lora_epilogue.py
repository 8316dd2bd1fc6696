"""A LoRA delta handed to the next op: the expand half of SGMV fused into the kernel that reads the projection.

In a decode step a projection's LoRA expand is a launch of a few microseconds that moves almost no bytes,
and with the side stream it also costs a zero-fill and an add on the main stream. Instead the projection
returns its base output y and the shrink's v, and the op that reads y next (add_rms_norm after o_proj and
down_proj, silu_and_mul after gate_up_proj) adds, row by row,

    y[t, off[i]:off[i+1]] += v[t, i*R:(i+1)*R] @ lora_b[slot(t), off[i]:off[i+1], :].T     (slot(t) != 0)

rounding to y's dtype where sgmv_expand stores into y. Only the first slot_rank[slot] columns of v's slice
are read, so rows of tokens without an adapter and padded rank columns may hold anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from punica.ops.sgmv import SegmentPlan, sgmv_expand_torch

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:  # the torch backend runs without Triton
    triton = tl = None
    _jit = lambda fn: fn  # noqa: E731


@dataclass
class LoRADelta:
    """The not-yet-added LoRA delta of one projection's output (layout in ops/sgmv.py)."""

    v: torch.Tensor             # [T, n*R] fp32: x @ A per slice, from sgmv_shrink
    lora_b: torch.Tensor        # [slots, off[-1], R], contiguous
    slot_rank: torch.Tensor     # [slots] int32
    plan: SegmentPlan           # plan.token_slot [T]: each token's slot
    slice_offsets: tuple[int, ...]

    def added_to(self, y: torch.Tensor) -> torch.Tensor:
        """Reference: a new tensor y + delta, rounded as sgmv_expand rounds."""
        y = y.clone()
        sgmv_expand_torch(self.v, self.lora_b, self.slot_rank, self.plan, y, self.slice_offsets)
        return y

    def kernel_args(self, y: torch.Tensor) -> tuple:
        """(v, lora_b, token_slot, slot_rank, v's row stride, R) for a fused Triton kernel writing y + delta."""
        T, R = y.shape[0], self.lora_b.shape[2]
        n = len(self.slice_offsets) - 1
        width = self.slice_offsets[-1]
        if (self.v.dtype != torch.float32 or tuple(self.v.shape) != (T, n * R) or self.v.stride(1) != 1 or
                not self.lora_b.is_contiguous() or self.lora_b.shape[1] != width or y.shape[1] != width or
                self.plan.token_slot.shape[0] < T or self.v.device != y.device):
            raise ValueError(f"LoRA delta v {tuple(self.v.shape)} {self.v.dtype}, lora_b {tuple(self.lora_b.shape)} "
                             f"(contiguous: {self.lora_b.is_contiguous()}) do not fit an output {tuple(y.shape)} "
                             f"with slices {self.slice_offsets}")
        return self.v, self.lora_b, self.plan.token_slot, self.slot_rank, self.v.stride(0), R


@_jit
def lora_delta_cols(v_row, b_slot, rows, mask, rank, R: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """fp32 [BLOCK]: sum over r < rank of v_row[r] * b_slot[rows, r] (zero where ~mask or rank is 0).
    v_row points at one token's slice of v, b_slot at lora_b[slot] ([out, R] row-major)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = (r < rank) & (r < R)
        vr = tl.load(v_row + r, mask=r_mask, other=0.0)
        b = tl.load(b_slot + rows[:, None] * R + r[None, :], mask=mask[:, None] & r_mask[None, :], other=0.0)
        acc += tl.sum(b.to(tl.float32) * vr[None, :], axis=1)
    return acc


@_jit
def token_rank(token_slot_ptr, slot_rank_ptr, t):
    """(slot, rank) of token t; rank 0 for slot 0, so lora_delta_cols adds nothing."""
    slot = tl.load(token_slot_ptr + t)
    return slot, tl.where(slot == 0, 0, tl.load(slot_rank_ptr + slot))
