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


def token_slots(seq_slots: list[int], seq_tokens: list[int]) -> list[int]:
    """The slot of every token (the per-token view of the same plan). Pure Python."""
    return [slot for slot, n in zip(seq_slots, seq_tokens) for _ in range(n)]


def _row_blocks(start: int, end: int, slot: int, rows: int) -> list[int]:
    """Tokens start..end of one segment as flat (start, end, slot) triples of at most `rows` tokens."""
    return [v for a in range(start, end, rows) for v in (a, min(a + rows, end), slot)]


def work_items(indptr: list[int], slots: list[int], rows: int, base: bool = False) -> list[int]:
    """Flat (start, end, slot) triples: every segment with an adapter (with `base`, every segment: slot 0
    too) cut into row blocks of <= `rows` tokens (SegmentPlan.items). At most ceil(T / rows) + S of them.
    Pure Python."""
    items: list[int] = []
    for s, slot in enumerate(slots):
        if slot or base:
            items += _row_blocks(indptr[s], indptr[s + 1], slot, rows)
    return items


def hybrid_items(indptr: list[int], slots: list[int], rows: int, single_max: int,
                 base: bool = False) -> tuple[list[int], list[int]]:
    """Work lists for the hybrid tiling (SegmentPlan.num_single): (single-token items, row-block items) as
    flat (start, end, slot) triples. Tokens of segments of at most `single_max` tokens become single items
    (each reads its adapter alone); longer segments are cut into blocks of <= `rows` (one read of the
    adapter per block). Segments without an adapter only with `base`. At most T singles and
    ceil(T / rows) + #segments blocks. Pure Python."""
    singles: list[int] = []
    blocks: list[int] = []
    for s, slot in enumerate(slots):
        start, end = indptr[s], indptr[s + 1]
        if not (slot or base):
            continue
        if end - start <= single_max:
            singles += _row_blocks(start, end, slot, 1)
        else:
            blocks += _row_blocks(start, end, slot, rows)
    return singles, blocks


def make_plan(indptr: list[int], slots: list[int], seg_indptr: torch.Tensor, seg_slot: torch.Tensor,
              token_slot: torch.Tensor) -> SegmentPlan:
    """A SegmentPlan from host lists and their device copies (which the caller moved as it likes)."""
    max_len = max((b - a for a, b in zip(indptr, indptr[1:])), default=0)
    return SegmentPlan(seg_indptr=seg_indptr, seg_slot=seg_slot, token_slot=token_slot, max_seg_len=max_len,
                       host_indptr=indptr, host_slot=slots)


def build_segment_plan(seq_slots: list[int], seq_tokens: list[int], device: torch.device) -> SegmentPlan:
    indptr, slots = segments(seq_slots, seq_tokens)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return make_plan(indptr, slots, tensor(indptr), tensor(slots), tensor(token_slots(seq_slots, seq_tokens)))
