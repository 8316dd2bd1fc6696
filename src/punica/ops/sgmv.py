"""SGMV: the LoRA add-on for a batch whose tokens are grouped into contiguous per-adapter segments.

Weight layout (the only one in the package; `lora/pool.py` writes it, kernels read it):

    lora_a[slot, i*R:(i+1)*R, :]          = A of output slice i, as PEFT stores `lora_A.weight` ([r, h_in]),
                                            zero-padded from the adapter's rank r to R = max_lora_rank
    lora_b[slot, off[i]:off[i+1], :]      = B of output slice i times its scale (alpha/r or alpha/sqrt(r)),
                                            as PEFT stores `lora_B.weight` ([h_out_i, r]), zero-padded to R
    slot_rank[slot]                        = r rounded up to the kernels' rank granule, 0 for empty slots

Slot 0 means "no adapter": kernels skip its segments and its weights stay zero. A projection with
several output slices (fused qkv: 3, gate_up: 2) applies one adapter per slice in the same launch.
The scale is folded into B when the adapter is loaded, so the kernels never see it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SegmentPlan:
    """Which adapter slot each contiguous run of tokens uses. Built once per step on the host.

    seg_indptr: [S+1] int32, tokens of segment s are seg_indptr[s]:seg_indptr[s+1]
    seg_slot:   [S] int32 adapter slot of each segment (0 = none)
    token_slot: [T] int32 slot of each token (the same information, per token)
    max_seg_len: host int, an upper bound on any segment's length (sizes the grid without a sync)
    host_indptr / host_slot: the same as Python lists, for the torch reference
    """

    seg_indptr: torch.Tensor
    seg_slot: torch.Tensor
    token_slot: torch.Tensor
    max_seg_len: int
    host_indptr: list[int]
    host_slot: list[int]

    @property
    def num_segments(self) -> int:
        return len(self.host_slot)

    @property
    def has_lora(self) -> bool:
        return any(self.host_slot)


def check_shapes(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 slice_offsets: tuple[int, ...], y: torch.Tensor) -> None:
    """Raise ValueError when the tensors do not follow the layout above."""
    n_slices = len(slice_offsets) - 1
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must be [T, h_in] and [T, h_out]")
    if lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1] or lora_a.shape[1] % n_slices:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} must be [slots, {n_slices}*R, {x.shape[1]}]")
    rank = lora_a.shape[1] // n_slices
    if tuple(lora_b.shape) != (lora_a.shape[0], slice_offsets[-1], rank) or y.shape[1] != slice_offsets[-1]:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} must be [{lora_a.shape[0]}, {slice_offsets[-1]}, {rank}]"
                         f" and y [T, {slice_offsets[-1]}]")
    if x.dtype != lora_a.dtype or y.dtype != lora_b.dtype:
        raise ValueError(f"dtype mismatch: x {x.dtype}, lora_a {lora_a.dtype}, y {y.dtype}, lora_b {lora_b.dtype}")


def sgmv_shrink_torch(x: torch.Tensor, lora_a: torch.Tensor, slot_rank: torch.Tensor,
                      plan: SegmentPlan, v: torch.Tensor) -> None:
    """v[t, :] = x[t] @ lora_a[slot(t)].T for every token of a segment with slot != 0 (others untouched).

    x: [T, h_in]; lora_a: [slots, n*R, h_in]; slot_rank: [slots] int32; v: [T, n*R], written in place.
    """
    p = plan.host_indptr
    for s, slot in enumerate(plan.host_slot):
        if slot and p[s + 1] > p[s]:
            v[p[s]:p[s + 1]] = (x[p[s]:p[s + 1]].float() @ lora_a[slot].float().T).to(v.dtype)


def sgmv_expand_torch(v: torch.Tensor, lora_b: torch.Tensor, slot_rank: torch.Tensor,
                      plan: SegmentPlan, y: torch.Tensor, slice_offsets: tuple[int, ...]) -> None:
    """y[t, off[i]:off[i+1]] += v[t, i*R:(i+1)*R] @ lora_b[slot(t), off[i]:off[i+1], :].T  (slot != 0).

    v: [T, n*R]; lora_b: [slots, off[-1], R]; y: [T, off[-1]], updated in place.
    """
    rank = lora_b.shape[2]
    p = plan.host_indptr
    for s, slot in enumerate(plan.host_slot):
        if not slot or p[s + 1] == p[s]:
            continue
        rows = slice(p[s], p[s + 1])
        for i in range(len(slice_offsets) - 1):
            cols = slice(slice_offsets[i], slice_offsets[i + 1])
            delta = v[rows, i * rank:(i + 1) * rank].float() @ lora_b[slot, cols].float().T
            y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)


def add_lora_torch(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   slot_rank: torch.Tensor, plan: SegmentPlan, slice_offsets: tuple[int, ...]) -> None:
    """y += per-token LoRA delta: shrink then expand (see the module docstring for the layout)."""
    if not plan.has_lora:
        return
    check_shapes(x, lora_a, lora_b, slice_offsets, y)
    v = x.new_zeros(x.shape[0], lora_a.shape[1])
    sgmv_shrink_torch(x, lora_a, slot_rank, plan, v)
    sgmv_expand_torch(v, lora_b, slot_rank, plan, y, slice_offsets)
