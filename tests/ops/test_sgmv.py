"""SGMV: the Triton shrink/expand/add_lora kernels against the torch references.

CPU tier: the kernels run in Triton's interpreter on small shapes (fp32, fp16; bf16 tl.dot is wrong there).
TRITON_INTERPRET is read when triton decorates a kernel; tests/conftest.py sets it before anything imports triton.
GPU tier (-m gpu): Llama shapes in bf16 against an fp32 reference, CUDA-graph replay bitwise equal to eager.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import pytest
import torch

from punica.ops import sgmv
from punica.ops.sgmv import SegmentPlan, add_lora_torch, sgmv_expand_torch, sgmv_shrink_torch
from punica.testing import assert_close
from punica.workload import POPULARITIES, adapter_indices

INTERPRETED = sgmv.triton is not None and not isinstance(sgmv._shrink_kernel, sgmv.triton.runtime.JITFunction)
# CPU tier: tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA, so these always run there
interpreted = pytest.mark.skipif(not INTERPRETED, reason="CPU-tier tests run in the Triton interpreter")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_plan(lengths: list[int], slots: list[int], device) -> SegmentPlan:
    """A plan with exactly these segments (empty ones and slot 0 included)."""
    indptr = [0]
    for n in lengths:
        indptr.append(indptr[-1] + n)
    token_slot = [s for s, n in zip(slots, lengths) for _ in range(n)]

    def t(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    return SegmentPlan(seg_indptr=t(indptr), seg_slot=t(slots), token_slot=t(token_slot),
                       max_seg_len=max(lengths, default=0), host_indptr=indptr, host_slot=list(slots))


def workload_plan(popularity: str, num_seqs: int, num_adapters: int, prefill: bool, device, seed=0):
    """Sequences drawn by `popularity` (every 7th without adapter), ordered by slot; decodes are one token,
    prefills 0..9 tokens (an empty sequence makes an empty segment); equal neighbours merge."""
    rng = random.Random(seed)
    slots = sorted(0 if i % 7 == 3 else a + 1
                   for i, a in enumerate(adapter_indices(popularity, num_seqs, num_adapters, seed)))
    lengths = [rng.randrange(0, 10) if prefill else 1 for _ in slots]
    seg_len, seg_slot = [], []
    for s, n in zip(slots, lengths):
        if seg_slot and seg_slot[-1] == s and n:
            seg_len[-1] += n
        else:
            seg_len.append(n)
            seg_slot.append(s)
    return make_plan(seg_len, seg_slot, device)


@functools.lru_cache(maxsize=4)
def make_weights(num_slots, h_in, widths, R, ranks, dtype, device, seed=0):
    """lora_a [slots, n*R, h_in], lora_b [slots, sum(widths), R] zero-padded past each slot's rank."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, N = len(widths), sum(widths)
    a = torch.randn(num_slots, n * R, h_in, generator=gen, device=device) / h_in ** 0.5
    b = torch.randn(num_slots, N, R, generator=gen, device=device) / R ** 0.5
    ranks = [0] + [ranks[i % len(ranks)] for i in range(num_slots - 1)]
    for s, r in enumerate(ranks):
        b[s, :, r:] = 0
        a[s].view(n, R, h_in)[:, r:] = 0
    return a.to(dtype), b.to(dtype), torch.tensor(ranks, dtype=torch.int32, device=device)


def offsets(widths):
    out = [0]
    for w in widths:
        out.append(out[-1] + w)
    return tuple(out)


def run_add_lora(plan, h_in, widths, R, ranks, dtype, device, num_slots=9, seed=0, overwrite=False):
    """(triton y, fp32 reference y) for one case; `overwrite`: y starts as NaN and must end as the delta."""
    T = plan.host_indptr[-1]
    lora_a, lora_b, slot_rank = make_weights(num_slots, h_in, widths, R, ranks, dtype, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(T, h_in, generator=gen, device=device).to(dtype)
    y0 = torch.randn(T, sum(widths), generator=gen, device=device).to(dtype)
    expected = torch.zeros_like(y0, dtype=torch.float32) if overwrite else y0.float().clone()
    add_lora_torch(expected, x.float(), lora_a.float(), lora_b.float(), slot_rank, plan, offsets(widths))
    y = torch.full_like(y0, float("nan")) if overwrite else y0.clone()
    sgmv.add_lora_triton(y, x, lora_a, lora_b, slot_rank, plan, offsets(widths), overwrite=overwrite)
    return y, expected


@pytest.fixture
def tuning():
    """set_tuning for one test, restored afterwards."""
    saved = dict(sgmv.TUNING)
    yield sgmv.set_tuning
    sgmv.set_tuning(**saved)


# ---- CPU tier (interpreter) -------------------------------------------------------------------------

WIDTHS = {"one": (40,), "gqa_qkv": (32, 8, 8), "gate_up": (24, 24)}


@interpreted
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("prefill,num_seqs", [(False, 1), (False, 5), (True, 6), (False, 17)])
@pytest.mark.parametrize("widths", WIDTHS.values(), ids=WIDTHS.keys())
def test_add_lora_matches_reference(popularity, prefill, num_seqs, widths):
    plan = workload_plan(popularity, num_seqs, num_adapters=8, prefill=prefill, device="cpu")
    y, expected = run_add_lora(plan, 48, widths, 16, ranks=(16, 8, 5, 1), dtype=torch.float32, device="cpu")
    assert_close(y, expected)


@interpreted
@pytest.mark.parametrize("mode", ["token", "segment", "split_token", "split_segment", "rank_chunks",
                                  "token_rank_chunks", "expand_tiles", "token_sum_each_k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_launch_modes(tuning, mode, dtype):
    """Token (BGMV) and segment tiling, each with split-K; ranks over several rank chunks; several N tiles
    per expand program (the last ones past the end); single tokens' shrink summing over k at every step."""
    knobs = dict(bgmv_max_seg=1 << 20 if "token" in mode else 0, max_block_m=16, max_block_k=32,
                 bgmv_block_r=32, expand_tiles=3 if mode == "expand_tiles" else 1,
                 expand_block_n=16 if mode == "expand_tiles" else 128,
                 shrink_sum_after=0 if mode == "token_sum_each_k" else 1)
    knobs["shrink_waves"] = 1 << 10 if "split" in mode else 0
    tuning(**knobs)
    plan = make_plan([3, 0, 1, 17, 2, 0, 1], [0, 1, 1, 2, 3, 0, 4], "cpu")  # empty, slot-0, > BLOCK_M
    R, ranks = (128, (128, 65, 64, 3)) if "rank_chunks" in mode else (16, (16, 9, 1))
    y, expected = run_add_lora(plan, 70, (40, 8), R, ranks, dtype, "cpu", num_slots=5)
    assert_close(y, expected, dtype=dtype)


def with_work_list(plan: SegmentPlan, rows: int, capacity: int) -> SegmentPlan:
    """The same plan with its work list (padded to `capacity` items) attached."""
    from punica.lora.plan import work_items
    flat = work_items(plan.host_indptr, plan.host_slot, rows)
    flat += [0, 0, 0] * (capacity - len(flat) // 3)
    items = torch.tensor(flat, dtype=torch.int32, device=plan.seg_indptr.device).view(-1, 3)
    return dataclasses.replace(plan, items=items, item_rows=rows)


@interpreted
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_work_list_mode(tuning, split, dtype):
    """Work-list tiling (CUDA graphs of mixed steps): blocks of <= 16 rows over segments of any length,
    padded with slot-0 items, equal the reference."""
    tuning(shrink_waves=1 << 10 if split else 0, max_block_k=32)
    plan = with_work_list(make_plan([3, 0, 1, 37, 2, 0, 1], [0, 1, 1, 2, 3, 0, 4], "cpu"), 16, capacity=12)
    y, expected = run_add_lora(plan, 70, (40, 8, 8), 16, (16, 9, 1), dtype, "cpu", num_slots=5)
    assert_close(y, expected, dtype=dtype)


@interpreted
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hybrid_work_list_mode(tuning, split, dtype):
    """Hybrid tiling (single tokens on the CUDA cores, longer segments in 16-row tensor-core blocks, both
    padded) in one launch equals the reference."""
    from punica.lora.plan import hybrid_items
    tuning(shrink_waves=1 << 10 if split else 0, max_block_k=32)
    plan = make_plan([3, 0, 1, 37, 1, 2, 0, 1], [0, 1, 1, 2, 5, 3, 0, 4], "cpu")
    singles, blocks = hybrid_items(plan.host_indptr, plan.host_slot, 16, single_max=1)
    assert len(singles) // 3 == 3 and len(blocks) // 3 == 4
    single_cap, block_cap = 5, 6
    flat = singles + [0, 0, 0] * (single_cap - len(singles) // 3) + blocks + [0, 0, 0] * (block_cap - len(blocks) // 3)
    items = torch.tensor(flat, dtype=torch.int32).view(-1, 3)
    plan = dataclasses.replace(plan, items=items, item_rows=16, num_single=single_cap)
    y, expected = run_add_lora(plan, 70, (40, 8, 8), 16, (16, 9, 1), dtype, "cpu", num_slots=6)
    assert_close(y, expected, dtype=dtype)


@interpreted
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("programs_per_sm", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_persistent_expand_walks_the_real_items_only(tuning, overwrite, programs_per_sm, dtype):
    """With item counts (CUDA graphs' lists), the persistent expand walks the real items on a fixed grid:
    it equals the reference, and the padding past the counts is never read (here it holds items that would
    add adapter 1 to every token, as the per-item grid shows)."""
    from punica.lora.plan import hybrid_items
    plan = make_plan([3, 0, 1, 37, 1, 2, 0, 1], [0, 1, 1, 2, 5, 3, 0, 4], "cpu")
    T, widths = plan.host_indptr[-1], (40, 8, 8)
    singles, blocks = hybrid_items(plan.host_indptr, plan.host_slot, 16, single_max=1, base=True)
    n_s, n_b = len(singles) // 3, len(blocks) // 3
    poison = [0, T, 1]
    plan = dataclasses.replace(plan, items=torch.tensor(singles + poison * 2 + blocks + poison * 3,
                                                        dtype=torch.int32).view(-1, 3),
                               item_rows=16, num_single=n_s + 2, items_cover=True,
                               item_count=torch.tensor([n_s, n_b], dtype=torch.int32))
    _, lora_b, slot_rank = make_weights(6, 70, widths, 16, (16, 9, 1), dtype, "cpu")
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(T, 3 * 16, generator=gen)
    y0 = torch.randn(T, sum(widths), generator=gen).to(dtype)
    expected = torch.zeros(T, sum(widths)) if overwrite else y0.float().clone()
    sgmv_expand_torch(v, lora_b.float(), slot_rank, plan, expected, offsets(widths))
    results = []
    for programs in (programs_per_sm, 0):
        tuning(expand_persistent=programs)
        grid = sgmv._expand_config(sgmv._tiling(plan, T), offsets(widths), 16, 1, True)[0]
        assert (grid == (programs, 1, 1)) == (programs > 0)
        y = torch.full_like(y0, float("nan")) if overwrite else y0.clone()
        sgmv._expand(v, lora_b, slot_rank, plan, y, offsets(widths), overwrite)
        results.append(y)
    assert_close(results[0], expected, dtype=dtype)
    assert not torch.allclose(results[1].float(), expected, atol=1e-2)  # the per-item grid reads the padding


@interpreted
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("programs_per_sm", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_persistent_shrink_and_expand_walk_the_real_items_only(tuning, split, programs_per_sm, dtype):
    """Both kernels persistent (split K or not): add_lora over a list whose padding holds items that would
    add adapter 1 to every token equals the reference; the per-item grids read that padding."""
    from punica.lora.plan import hybrid_items
    tuning(shrink_waves=1 << 10 if split else 0, max_block_k=32)
    plan = make_plan([3, 0, 1, 37, 1, 2, 0, 1], [0, 1, 1, 2, 5, 3, 0, 4], "cpu")
    T = plan.host_indptr[-1]
    singles, blocks = hybrid_items(plan.host_indptr, plan.host_slot, 16, single_max=1)
    n_s, n_b = len(singles) // 3, len(blocks) // 3
    poison = [0, T, 1]
    plan = dataclasses.replace(plan, items=torch.tensor(singles + poison * 2 + blocks + poison * 3,
                                                        dtype=torch.int32).view(-1, 3),
                               item_rows=16, num_single=n_s + 2, item_count=torch.tensor([n_s, n_b], dtype=torch.int32))
    tuning(shrink_persistent=programs_per_sm, expand_persistent=programs_per_sm)
    tiling = sgmv._tiling(plan, T)
    grid, _, _, split_k = sgmv._shrink_config(tiling, 70, 48, 3, 1, True)
    assert grid == (programs_per_sm, 1, 1) and (split_k > 1) == split
    y, expected = run_add_lora(plan, 70, (40, 8, 8), 16, (16, 9, 1), dtype, "cpu", num_slots=6)
    assert_close(y, expected, dtype=dtype)
    tuning(shrink_persistent=0, expand_persistent=0)
    wrong, _ = run_add_lora(plan, 70, (40, 8, 8), 16, (16, 9, 1), dtype, "cpu", num_slots=6)
    assert not torch.allclose(wrong.float(), expected, atol=1e-2)


def test_split_by_tokens_sizes_split_k_by_real_row_blocks(tuning):
    """A mixed graph's work list holds capacity for the worst case (a 256-token bucket at batch 32: 32
    singles + 40 blocks); split_by_tokens sizes split K by the bucket's 8 row blocks instead, so the few
    busy programs are not left with the whole K loop each. Other tilings are unaffected."""
    hybrid = (256, 0, 0, 72, 32, 32)  # (T, S, L, items, item_rows, num_single)
    token = (32, 32, 1, 0, 0, 0)
    tuning(split_by_tokens=0)
    before = [sgmv._shrink_config(t, 4096, 48, 3, 132)[0] for t in (hybrid, token)]
    tuning(split_by_tokens=1)
    after = [sgmv._shrink_config(t, 4096, 48, 3, 132)[0] for t in (hybrid, token)]
    assert after[0][1] > before[0][1] and after[0][0] == before[0][0] == 72
    assert after[1] == before[1]
    # A decode graph's list (32 singles + 9 blocks at batch 32), whose singles could hold every token, keeps
    # the split of its capacity up to split_by_capacity_max tokens; beyond, it is sized by tokens
    decode = (32, 0, 0, 41, 32, 32)
    tuning(split_by_tokens=0)
    decode_before = sgmv._shrink_config(decode, 4096, 48, 3, 132)[0]
    tuning(split_by_tokens=1)
    assert sgmv._shrink_config(decode, 4096, 48, 3, 132)[0] == decode_before
    tuning(split_by_capacity_max=16)
    assert sgmv._shrink_config(decode, 4096, 48, 3, 132)[0][1] > decode_before[1]


def test_work_items_cover_adapter_tokens_once():
    from punica.lora.plan import work_items
    flat = work_items([0, 3, 3, 40, 42], [1, 0, 2, 3], 16)
    items = [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
    assert items == [(0, 3, 1), (3, 19, 2), (19, 35, 2), (35, 40, 2), (40, 42, 3)]
    assert len(items) <= -(-42 // 16) + 4
    flat = work_items([0, 3, 3, 40, 42], [1, 0, 2, 3], 16, base=True)  # base: the (empty) slot-0 segment too
    assert flat == work_items([0, 3, 3, 40, 42], [1, 0, 2, 3], 16)
    flat = work_items([0, 2, 5], [0, 7], 16, base=True)
    assert [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)] == [(0, 2, 0), (2, 5, 7)]


@interpreted
@pytest.mark.parametrize("num_slices", [None, 1, 2])
def test_shrink_matches_reference(tuning, num_slices):
    tuning(shrink_waves=1 << 10, max_block_k=16)
    plan = make_plan([2, 4, 0, 3], [1, 0, 2, 1], "cpu")
    n = num_slices or 1
    lora_a, _, slot_rank = make_weights(3, 40, (8,) * n, 16, (16, 7), torch.float32, "cpu")
    x = torch.randn(9, 40)
    v = torch.full((9, n * 16), float("nan"))
    expected = v.clone()
    sgmv_shrink_torch(x, lora_a, slot_rank, plan, expected)
    sgmv.sgmv_shrink_triton(x, lora_a, slot_rank, plan, v, num_slices=num_slices)
    assert torch.equal(v.isnan(), expected.isnan())  # slot-0 rows untouched, every other row written
    assert_close(v.nan_to_num(), expected.nan_to_num())


@interpreted
@pytest.mark.parametrize("widths", [(24,), (16, 8), (16, 8, 8)])
def test_expand_matches_reference(widths):
    plan = make_plan([1, 5, 0, 2, 3], [2, 1, 3, 0, 3], "cpu")
    _, lora_b, slot_rank = make_weights(4, 8, widths, 16, (16, 3, 12), torch.float16, "cpu")
    v = torch.randn(11, len(widths) * 16).half()
    y = torch.randn(11, sum(widths)).half()
    expected = y.clone()
    sgmv_expand_torch(v, lora_b, slot_rank, plan, expected, offsets(widths))
    sgmv.sgmv_expand_triton(v, lora_b, slot_rank, plan, y, offsets(widths))
    assert_close(y, expected)


@interpreted
@pytest.mark.parametrize("lengths,slots", [([1] * 6, [0, 1, 2, 0, 3, 1]), ([3, 0, 1, 17, 2], [0, 1, 1, 2, 3]),
                                           ([2, 1], [0, 0])], ids=["decode", "prefill", "no_adapter"])
def test_overwrite_writes_the_delta_over_anything(lengths, slots):
    """add_lora(overwrite=True): y = the delta, zero where a token has no adapter, whatever y held (NaN here):
    in the expand kernel, whose row programs cover every token in token mode (decode) and in segment mode
    (prefill: slot-0 segments write zeros). A plan whose segments end before y's last row is zero-filled first."""
    plan = make_plan(lengths, slots, "cpu")
    T = sum(lengths)
    mode = sgmv._row_tiling(*sgmv._tiling(plan, T))[0]
    assert mode == (sgmv.TOKEN if lengths == [1] * 6 else sgmv.SEGMENT)
    assert sgmv._covers(plan, mode, T) and (mode == sgmv.TOKEN or not sgmv._covers(plan, mode, T + 1))
    y, expected = run_add_lora(plan, 48, (32, 8, 8), 16, (16, 8, 5), torch.float32, "cpu", overwrite=True)
    assert not y.isnan().any()
    assert_close(y, expected)
    ref = torch.full_like(y, float("nan"))
    a, b, ranks = make_weights(9, 48, (32, 8, 8), 16, (16, 8, 5), torch.float32, "cpu")
    add_lora_torch(ref, torch.randn(len(y), 48), a, b, ranks, plan, offsets((32, 8, 8)), overwrite=True)
    assert not ref.isnan().any()


@interpreted
@pytest.mark.parametrize("tiling", ["segment", "token", "work list", "hybrid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dora_scale_multiplies_the_adapters_rows_in_the_expand(tuning, tiling, dtype):
    """`scale` [slots, N] (DoRA): the rows of tokens with an adapter become (y + delta) * scale[slot] in the expand's
    pass, rows without one stay y; add_lora and sgmv_expand alike, each equal to the reference; refused with
    overwrite and in the wrong shape or dtype."""
    from punica.lora.plan import hybrid_items
    tuning(bgmv_max_seg=1 << 20 if tiling == "token" else 0, max_block_k=32)
    lengths, slots = [3, 0, 1, 17, 1, 2, 1], [0, 1, 1, 2, 4, 3, 4]
    plan = make_plan(lengths, slots, "cpu")
    if tiling == "work list":
        plan = with_work_list(plan, 16, capacity=8)
    elif tiling == "hybrid":
        singles, blocks = hybrid_items(plan.host_indptr, plan.host_slot, 16, single_max=1)
        flat = singles + [0, 0, 0] + blocks + [0, 0, 0] * 2
        plan = dataclasses.replace(plan, items=torch.tensor(flat, dtype=torch.int32).view(-1, 3), item_rows=16,
                                   num_single=len(singles) // 3 + 1)
    widths, T = (32, 8, 8), sum(lengths)
    a, b, ranks = make_weights(6, 40, widths, 16, (16, 8, 5), dtype, "cpu")
    gen = torch.Generator().manual_seed(3)
    x, y0 = torch.randn(T, 40, generator=gen).to(dtype), torch.randn(T, 48, generator=gen).to(dtype)
    scale = (0.5 + torch.rand(6, 48, generator=gen)).to(dtype)
    expected = y0.clone()
    add_lora_torch(expected, x, a, b, ranks, plan, offsets(widths), scale=scale)
    unscaled = y0.clone()
    add_lora_torch(unscaled, x, a, b, ranks, plan, offsets(widths))
    adapter_rows = torch.tensor([s != 0 for n, s in zip(lengths, slots) for _ in range(n)])
    assert torch.equal(expected[~adapter_rows], y0[~adapter_rows])
    assert not torch.allclose(expected[adapter_rows], unscaled[adapter_rows])
    y = y0.clone()
    sgmv.add_lora_triton(y, x, a, b, ranks, plan, offsets(widths), scale=scale)
    assert_close(y, expected, dtype=dtype)
    v = torch.zeros(T, a.shape[1], dtype=torch.float32)
    sgmv.sgmv_shrink_triton(x, a, ranks, plan, v, 3)
    y = y0.clone()
    sgmv.sgmv_expand_triton(v, b, ranks, plan, y, offsets(widths), scale)
    assert_close(y, expected, dtype=dtype)
    with pytest.raises(ValueError, match="cannot go with overwrite"):
        sgmv.add_lora_triton(y, x, a, b, ranks, plan, offsets(widths), overwrite=True, scale=scale)
    with pytest.raises(ValueError, match="scale must be \\[6, 48\\]"):
        sgmv.add_lora_triton(y, x, a, b, ranks, plan, offsets(widths), scale=scale[:, :40])


@interpreted
@pytest.mark.parametrize("hybrid", [False, True], ids=["work_list", "hybrid"])
def test_overwrite_over_covering_work_list_writes_every_token_without_a_fill(hybrid):
    """A CUDA graph's work list with slot-0 items for the base-model tokens (items_cover): the overwriting
    expand writes the delta, zeros for tokens without an adapter, in the kernel. The bucket's padding rows
    past the step's tokens, in no item, keep what they held (NaN): y was not zero-filled first."""
    from punica.lora.plan import hybrid_items, work_items
    lengths, slots = [3, 0, 1, 17, 1, 2, 1], [0, 1, 1, 2, 0, 3, 4]
    real = sum(lengths)
    plan = make_plan(lengths + [5], slots + [0], "cpu")  # 5 padding rows (token slot 0) after the step's tokens
    indptr, host_slot = plan.host_indptr[:-1], plan.host_slot[:-1]
    singles, blocks = hybrid_items(indptr, host_slot, 16, 1, base=True) if hybrid else \
        ([], work_items(indptr, host_slot, 16, base=True))
    assert {slot for slot in (singles + blocks)[2::3]} == {0, 1, 2, 3, 4}
    flat = singles + [0, 0, 0] + blocks + [0, 0, 0] * 2  # padded like a graph's list
    items = torch.tensor(flat, dtype=torch.int32).view(-1, 3)
    plan = dataclasses.replace(plan, items=items, item_rows=16, num_single=len(singles) // 3 + 1 if hybrid else 0,
                               items_cover=True)
    y, expected = run_add_lora(plan, 48, (32, 8, 8), 16, (16, 8, 5), torch.float32, "cpu", overwrite=True)
    assert not y[:real].isnan().any() and y[real:].isnan().all()
    assert_close(y[:real], expected[:real])
    assert torch.equal(y[:3], torch.zeros_like(y[:3])) and torch.equal(y[21], torch.zeros_like(y[21]))
    uncovered = dataclasses.replace(plan, items_cover=False)  # without the flag: zero-filled first, as before
    y, _ = run_add_lora(uncovered, 48, (32, 8, 8), 16, (16, 8, 5), torch.float32, "cpu", overwrite=True)
    assert torch.equal(y[real:], torch.zeros_like(y[real:]))


@interpreted
def test_no_adapter_leaves_y_alone():
    plan = make_plan([3, 2], [0, 0], "cpu")
    y, expected = run_add_lora(plan, 16, (16,), 16, (16,), torch.float32, "cpu")
    assert torch.equal(y, expected)


@pytest.mark.skipif(sgmv.triton is None, reason="triton is not installed")
@pytest.mark.parametrize("bad", ["dtype", "stride", "plan_dtype", "shape", "slices", "token_slot"]
                         + ([] if INTERPRETED else ["device"]))  # CPU tensors are valid while interpreting
def test_wrapper_rejects_bad_inputs(bad):
    plan = make_plan([2, 1], [1, 2], "cpu")
    lora_a, lora_b, slot_rank = make_weights(3, 16, (8,), 16, (16,), torch.float32, "cpu")
    x, y, offs = torch.randn(3, 16), torch.randn(3, 8), (0, 8)
    if bad == "dtype":
        x, lora_a = x.double(), lora_a.double()
    elif bad == "stride":
        x = torch.randn(16, 3).t()
    elif bad == "plan_dtype":
        plan.seg_slot = plan.seg_slot.long()
    elif bad == "shape":
        y = torch.randn(3, 9)
    elif bad == "slices":
        offs, lora_b, y = (0, 2, 4, 6, 8), torch.zeros(3, 8, 4), torch.zeros(3, 8)
    elif bad == "token_slot":
        plan.token_slot = plan.token_slot[:2]
    elif bad == "device":
        pass  # CPU tensors without the interpreter are themselves the error
    with pytest.raises(ValueError):
        sgmv.add_lora_triton(y, x, lora_a, lora_b, slot_rank, plan, offs)


@interpreted
def test_plan_is_checked_once_per_step_shape():
    """The plan's checks run once for the projections of a step, again for another token count."""
    plan = make_plan([2, 1], [1, 2], "cpu")
    lora_a, lora_b, slot_rank = make_weights(3, 16, (8,), 16, (16,), torch.float32, "cpu")
    sgmv.add_lora_triton(torch.zeros(3, 8), torch.randn(3, 16), lora_a, lora_b, slot_rank, plan, (0, 8))
    assert plan.__dict__["_checked"] == (id(slot_rank), -1, 3)
    with pytest.raises(ValueError, match="token_slot has 3 entries for 4 tokens"):
        sgmv.add_lora_triton(torch.zeros(4, 8), torch.randn(4, 16), lora_a, lora_b, slot_rank, plan, (0, 8))


def test_direct_launches_leave_profiler_hooks_to_triton():
    """Launches skip Triton's launch path only while no launch hook is set (a profiler's would be skipped)."""
    from punica.ops import sgmv_launch
    knobs = pytest.importorskip("triton").knobs
    assert not sgmv_launch._launch_hooks()
    hook = lambda *args: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert sgmv_launch._launch_hooks()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert not sgmv_launch._launch_hooks()


# ---- GPU tier -----------------------------------------------------------------------------------------

LLAMA_WIDTHS = {"o": (4096,), "qkv_gqa": (4096, 1024, 1024), "gate_up": (11008, 11008)}
GPU_TOKENS = [1, 3, 16, 31, 64, 128, 255, 256]


def gpu_plan(popularity, T, seed=0):
    """T tokens: decodes when T is odd or <= 64 (one token a sequence), else 2..33-token prefills."""
    if T % 2 or T <= 64:
        return workload_plan(popularity, T, 32 if popularity == "uniform" else 128, False, "cuda", seed)
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < T:
        lengths.append(min(rng.randrange(2, 34), T - sum(lengths)))
    adapters = sorted(a + 1 for a in adapter_indices(popularity, len(lengths), 128, seed))
    slots = [0 if i == 1 else s for i, s in enumerate(adapters)]
    order = sorted(range(len(slots)), key=slots.__getitem__)
    return make_plan([lengths[i] for i in order] + [0], [slots[i] for i in order] + [129], "cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("T", GPU_TOKENS)
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("widths", LLAMA_WIDTHS.values(), ids=LLAMA_WIDTHS.keys())
def test_gpu_bf16_matches_fp32_reference(widths, popularity, T):
    plan = gpu_plan(popularity, T)
    y, expected = run_add_lora(plan, 4096, widths, 64, (64, 8, 16, 32, 5), torch.bfloat16, "cuda",
                               num_slots=130)
    assert_close(y.float(), expected, dtype=torch.bfloat16)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 33, 200])
def test_gpu_fp16_fp32_rank128(dtype, T):
    plan = gpu_plan("zipf:1.5", T, seed=3)
    y, expected = run_add_lora(plan, 4096, (2048, 512, 512), 128, (128, 100, 1, 64), dtype, "cuda",
                               num_slots=130)
    assert_close(y.float(), expected, dtype=dtype)


def as_work_list(plan: SegmentPlan, hybrid: bool, rows: int = 32, counted: bool = False) -> SegmentPlan:
    """The plan as the CUDA graphs give it: a work list (hybrid: single tokens first), padded; `counted`:
    with the real items' counts (SegmentPlan.item_count)."""
    from punica.lora.plan import hybrid_items, work_items
    if hybrid:
        singles, blocks = hybrid_items(plan.host_indptr, plan.host_slot, rows, single_max=1)
    else:
        singles, blocks = [], work_items(plan.host_indptr, plan.host_slot, rows)
    n_single = len(singles) // 3 + 2 if hybrid else 0
    flat = singles + [0, 0, 0] * (n_single - len(singles) // 3) + blocks + [0, 0, 0] * 3
    items = torch.tensor(flat, dtype=torch.int32, device=plan.seg_indptr.device).view(-1, 3)
    count = torch.tensor([len(singles) // 3, len(blocks) // 3], dtype=torch.int32, device=items.device)
    return dataclasses.replace(plan, items=items, item_rows=rows, num_single=n_single,
                               item_count=count if counted else None)


@gpu
@needs_cuda
@pytest.mark.parametrize("persistent", [0, 4])
@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("T", [1, 31, 64, 255, 256])
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_gpu_work_lists(tuning, popularity, T, hybrid, persistent):
    """Work-list and hybrid tilings (the CUDA graphs' LoRA) at Llama shapes in bf16; `persistent`: the
    shrink and expand walk the real items on fixed grids (TUNING["shrink_persistent"], ["expand_persistent"])."""
    tuning(shrink_persistent=persistent, expand_persistent=persistent)
    plan = as_work_list(gpu_plan(popularity, T, seed=9), hybrid, counted=bool(persistent))
    y, expected = run_add_lora(plan, 4096, (4096, 1024, 1024), 64, (64, 16, 8), torch.bfloat16, "cuda",
                               num_slots=130)
    assert_close(y.float(), expected, dtype=torch.bfloat16)


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["token", "segment"])
@pytest.mark.parametrize("popularity", ["distinct", "identical", "skewed"])
def test_gpu_both_tilings(tuning, mode, popularity):
    tuning(bgmv_max_seg=1 << 20 if mode == "token" else 0)
    plan = gpu_plan(popularity, 128, seed=5)
    y, expected = run_add_lora(plan, 4096, (4096, 1024, 1024), 64, (64, 16), torch.bfloat16, "cuda",
                               num_slots=130)
    assert_close(y.float(), expected, dtype=torch.bfloat16)


@gpu
@needs_cuda
def test_gpu_persistent_lora_graph_follows_the_counts(tuning):
    """A captured persistent shrink + expand reads its items and their counts at replay: after the buffers
    are rewritten with another step's list (other segments, other counts), the replay equals that step
    eagerly."""
    tuning(shrink_persistent=4, expand_persistent=4)
    widths, T = (4096, 1024, 1024), 256
    lora_a, lora_b, slot_rank = make_weights(130, 4096, widths, 64, (64, 16, 8), torch.bfloat16, "cuda")
    x = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16)
    steps = [as_work_list(gpu_plan(pop, T, seed=i), True, counted=True)
             for i, pop in enumerate(("identical", "distinct", "skewed"))]
    n_single = max(p.num_single for p in steps)  # one capacity for every step, as a graph bucket has
    n_block = max(len(p.items) - p.num_single for p in steps)

    def relayout(plan):
        singles, blocks = plan.items[:plan.num_single], plan.items[plan.num_single:]
        pad = [torch.zeros(n, 3, dtype=torch.int32, device="cuda")
               for n in (n_single - len(singles), n_block - len(blocks))]
        return dataclasses.replace(plan, items=torch.cat([singles, pad[0], blocks, pad[1]]), num_single=n_single)

    steps = [relayout(p) for p in steps]
    graph_plan = dataclasses.replace(steps[0], items=steps[0].items.clone(), item_count=steps[0].item_count.clone())
    y = torch.zeros(T, sum(widths), device="cuda", dtype=torch.bfloat16)
    run = lambda plan, out: sgmv.add_lora_triton(out, x, lora_a, lora_b, slot_rank, plan, offsets(widths),
                                                 overwrite=True)
    run(graph_plan, y)  # compiles (and allocates the split-K counters) before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(graph_plan, y)
    for step in (*steps, steps[0]):
        graph_plan.items.copy_(step.items)
        graph_plan.item_count.copy_(step.item_count)
        graph.replay()
        expected = torch.full_like(y, float("nan"))
        run(step, expected)
        torch.cuda.synchronize()
        assert torch.equal(y, expected)


@gpu
@needs_cuda
@pytest.mark.parametrize("popularity,T", [("distinct", 1), ("distinct", 64), ("identical", 256),
                                          ("skewed", 128), ("uniform", 33)])
def test_gpu_graph_replay_bitwise_equal_to_eager(popularity, T):
    plan = gpu_plan(popularity, T, seed=7)
    widths = (4096, 1024, 1024)
    lora_a, lora_b, slot_rank = make_weights(130, 4096, widths, 64, (64, 16, 8), torch.bfloat16, "cuda")
    x = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16)
    y0 = torch.randn(T, sum(widths), device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(10):  # eager runs agree with each other (split-K has no race)
        y = y0.clone()
        sgmv.add_lora_triton(y, x, lora_a, lora_b, slot_rank, plan, offsets(widths))
        runs.append(y)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    y = y0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sgmv.add_lora_triton(y, x, lora_a, lora_b, slot_rank, plan, offsets(widths))
    for _ in range(3):
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, runs[0])


@gpu
@needs_cuda
def test_gpu_direct_launches_keep_alignment_specializations_apart():
    """A kernel compiled for 16-byte aligned tensors must not be launched directly for unaligned ones (its
    vector loads would fault or read wrong data): aligned, unaligned (views one element in), aligned again."""
    plan = gpu_plan("skewed", 64, seed=2)
    lora_a, lora_b, slot_rank = make_weights(130, 4096, (4096,), 64, (64, 16), torch.bfloat16, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(4)
    for shift in (0, 1, 0, 1):
        x = torch.randn(64 * 4096 + 1, generator=gen, device="cuda").bfloat16()[shift:shift + 64 * 4096].view(64, 4096)
        y0 = torch.randn(64 * 4096 + 1, generator=gen, device="cuda").bfloat16()[shift:shift + 64 * 4096].view(64, 4096)
        assert (x.data_ptr() % 16 == 0) == (shift == 0)
        expected = y0.float().clone()
        add_lora_torch(expected, x.float(), lora_a.float(), lora_b.float(), slot_rank, plan, (0, 4096))
        y = y0.clone() if shift == 0 else torch.empty(64 * 4096 + 1, device="cuda").bfloat16()[1:].view(64, 4096)
        y.copy_(y0)
        sgmv.add_lora_triton(y, x, lora_a, lora_b, slot_rank, plan, (0, 4096))
        assert_close(y.float(), expected, dtype=torch.bfloat16)
