"""Segment planning: sequences sorted by adapter slot become contiguous per-slot token segments."""

from __future__ import annotations

import torch

from punica.ops.sgmv import SegmentPlan


def segments(seq_slots: list[int], seq_tokens: list[int]) -> tuple[list[int], list[int]]:
    """Merge neighbouring sequences with the same slot: (indptr [S+1], slot [S]). Pure Python.

    seq_slots must be sorted so equal slots are adjacent (the runner orders sequences that way).
    """
    indptr, slots = [0], []
    for slot, n in zip(seq_slots, seq_tokens):
        if slots and slots[-1] == slot:
            indptr[-1] += n
        else:
            slots.append(slot)
            indptr.append(indptr[-1] + n)
    return indptr, slots


def build_segment_plan(seq_slots: list[int], seq_tokens: list[int], device: torch.device) -> SegmentPlan:
    indptr, slots = segments(seq_slots, seq_tokens)
    token_slot = [slot for slot, n in zip(seq_slots, seq_tokens) for _ in range(n)]
    lengths = [b - a for a, b in zip(indptr, indptr[1:])]

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return SegmentPlan(seg_indptr=tensor(indptr), seg_slot=tensor(slots), token_slot=tensor(token_slot),
                       max_seg_len=max(lengths, default=0), host_indptr=indptr, host_slot=slots)
