"""Segment planning (pure Python part) and the plan the runner hands to the model."""

from __future__ import annotations

import torch

from punica.lora.plan import build_segment_plan, segments, token_slots


def test_neighbours_with_one_slot_merge_into_one_segment():
    assert segments([0, 0, 2, 2, 2, 5], [3, 1, 1, 4, 1, 2]) == ([0, 4, 10, 12], [0, 2, 5])
    assert segments([], []) == ([0], [])
    assert segments([1, 1], [0, 2]) == ([0, 2], [1])  # an empty sequence joins its neighbour
    assert token_slots([0, 2, 5], [2, 1, 0]) == [0, 0, 2]


def test_built_plan_matches_its_host_lists():
    plan = build_segment_plan([0, 3, 3, 7], [2, 1, 4, 1], torch.device("cpu"))
    assert plan.host_indptr == [0, 2, 7, 8] and plan.host_slot == [0, 3, 7]
    assert plan.seg_indptr.tolist() == plan.host_indptr and plan.seg_slot.tolist() == plan.host_slot
    assert plan.token_slot.tolist() == [0, 0, 3, 3, 3, 3, 3, 7] and plan.max_seg_len == 5
    assert plan.has_lora and plan.num_segments == 3
    assert not build_segment_plan([0, 0], [3, 1], torch.device("cpu")).has_lora
