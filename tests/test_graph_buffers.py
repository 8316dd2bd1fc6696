"""StaticBuffers.write: a step's metadata lands in the graph buffers exactly, whatever a previous step left."""

from __future__ import annotations

import pytest
import torch

from punica.engine.cuda_graph import MIN_MIXED_BUCKET, StaticBuffers, is_sparse, token_buckets
from punica.engine.request import SamplingParams, Sequence
from punica.engine.runner import host_batch, order_by_slot
from punica.lora.plan import hybrid_items, segments, token_slots, work_items
from punica.ops.attention import query_tiles

BLOCK = 4


def make_seqs(contexts: list[int], slots: list[int], first_block: int = 0) -> list[Sequence]:
    seqs, block = [], first_block
    for i, (ctx, slot) in enumerate(zip(contexts, slots)):
        seq = Sequence(request_id=f"r{i}", prompt_ids=list(range(10 + i, 10 + i + ctx)), params=SamplingParams())
        seq.num_computed = ctx - 1
        n = -(-ctx // BLOCK)
        seq.block_table = list(range(block, block + n))
        block += n
        seq.slot = slot
        seqs.append(seq)
    return seqs


def check(buf: StaticBuffers, hb, t: int, kind: str) -> None:
    m, n = len(hb.ids), len(hb.kv_lens)
    mixed = kind == "mixed"
    h64, h = buf.host64, buf.h
    assert h64[0, :t].tolist() == hb.ids + [0] * (t - m)
    assert h64[1, :t].tolist() == hb.positions + [0] * (t - m)
    assert h64[2, :t].tolist() == hb.slot_mapping + [-1] * (t - m)
    logits = hb.logits_indices if mixed else list(range(t))
    assert h64[3, :t].tolist() == logits + [0] * (t - len(logits))
    b = buf.B if mixed else t
    assert h["cu_q"][:b + 1].tolist() == (hb.cu_q + [hb.cu_q[-1]] * (b - n) if mixed else list(range(b + 1)))
    assert h["kv_lens"][:b].tolist() == hb.kv_lens + [0] * (b - n)
    for i, table in enumerate(hb.block_tables):
        assert h["tables"][i, :len(table)].tolist() == table
    assert h["token_slot"][:t].tolist() == token_slots(hb.seq_slots, hb.seq_tokens) + [0] * (t - m)
    if not mixed:  # decode: a permutation of the bucket's rows, longest context first, padding last
        order = h["order"][:t].tolist()
        assert sorted(order) == list(range(t))
        lens = hb.kv_lens + [0] * (t - n)
        assert [lens[i] for i in order] == sorted(lens, reverse=True)
        assert order[n:] == list(range(n, t)) or min(hb.kv_lens, default=1) == 0
    n_single, n_block = buf.item_capacity(t, kind)
    if not n_single + n_block:  # decode graphs without hybrid lists tile per token: no work list
        assert kind == "decode" and not buf.is_hybrid(kind, t)
        return
    indptr, slots = segments(hb.seq_slots, hb.seq_tokens)
    # graphs' lists hold the base-model tokens too (slot-0 items): an overwriting expand writes their zeros
    if buf.is_hybrid(kind, t):
        singles, blocks = hybrid_items(indptr, slots, buf.item_rows, buf.single_max(kind), base=True)
    else:
        singles, blocks = [], work_items(indptr, slots, buf.item_rows, base=True)
    assert 0 not in hb.seq_slots or 0 in (singles + blocks)[2::3]
    assert h["item_count"].tolist() == [len(singles) // 3, len(blocks) // 3]
    expected = singles + [0] * (3 * n_single - len(singles)) + blocks + [0] * (3 * n_block - len(blocks))
    assert h["items"][:3 * (n_single + n_block)].tolist() == expected


def check_tiles(buf: StaticBuffers, hb, t: int) -> None:
    """A mixed step's attention tiles, padded with empty (-1, 0) tiles."""
    tiles, capacity = query_tiles(hb.cu_q, buf.tile_rows), buf.tile_capacity(t)
    assert buf.h["tiles"][:2 * capacity].tolist() == tiles + [-1, 0] * (capacity - len(tiles) // 2)


@pytest.mark.parametrize("hybrid,decode_max", [(frozenset(), 0), (frozenset({"mixed"}), 0),
                                               (frozenset({"decode", "mixed"}), 0), (frozenset({"mixed"}), 4),
                                               (frozenset({"mixed"}), 2)])
def test_write_overwrites_a_bigger_previous_step(hybrid, decode_max):
    buf = StaticBuffers(64, 8, 16, 4, 8, torch.device("cpu"), hybrid, single_max=(2, 3),
                        hybrid_decode_max=decode_max)
    assert buf.is_hybrid("decode", 4) == ("decode" in hybrid or decode_max == 4)
    assert buf.is_hybrid("decode", 2) == ("decode" in hybrid or decode_max > 0)
    assert buf.is_hybrid("sparse", 8) and buf.is_hybrid("mixed", 64) == ("mixed" in hybrid)
    # a big mixed step first, so every buffer holds values the next steps must not leak
    big = make_seqs([40, 33, 21, 9, 17, 5, 12, 8], [3, 3, 1, 0, 2, 2, 5, 5], first_block=100)
    big[0].num_computed -= 30
    work = order_by_slot({s: 31 if i == 0 else 1 for i, s in enumerate(big)})
    hb = host_batch(work, BLOCK)
    buf.write(hb, 64, "mixed")
    check(buf, hb, 64, "mixed")
    check_tiles(buf, hb, 64)
    small = make_seqs([6, 13, 3], [2, 0, 2])
    hb = host_batch(order_by_slot({s: 1 for s in small}), BLOCK)
    for kind in ("decode", "sparse"):  # a decode bucket's two graphs
        buf.write(hb, 4, kind)
        check(buf, hb, 4, kind)
    small[1].num_computed -= 5
    hb = host_batch(order_by_slot({s: 6 if i == 1 else 1 for i, s in enumerate(small)}), BLOCK)
    buf.write(hb, 16, "mixed")
    check(buf, hb, 16, "mixed")
    check_tiles(buf, hb, 16)


@pytest.mark.parametrize("slots,single_max,fraction,expected", [
    ([1, 2, 3, 4], 1, 0.5, False),        # every sequence its own adapter: 4 single items
    ([1, 1, 1, 1], 1, 0.0, True),         # one shared adapter: no single items
    ([1, 1, 2, 3, 3, 3], 1, 0.25, True),  # runs of 2, 1, 3: one single item of 6
    ([1, 1, 2, 3, 3, 3], 2, 0.25, False),  # with runs of up to 2 as single items: 3 of 6
    ([1, 1, 2, 3, 3, 3], 2, 0.5, True),
    ([0, 0, 5], 3, 0.9, False),           # slot 0 (no adapter) counts like any run
])
def test_is_sparse_counts_the_single_items_of_a_decode_step(slots, single_max, fraction, expected):
    assert is_sparse(segments(slots, [1] * len(slots))[0], single_max, fraction) == expected


@pytest.mark.parametrize("max_tokens", [64, 300, 2048, 4096, 5000])
def test_token_buckets_pad_a_mixed_step_by_at_most_a_quarter(max_tokens):
    """Every step of 1..max_tokens tokens has a bucket; it pads by less than MIN_MIXED_BUCKET tokens or a quarter
    of the step (powers of two padded a 287-token step to 512)."""
    buckets = token_buckets(max_tokens)
    assert buckets == sorted(set(buckets)) and buckets[0] == MIN_MIXED_BUCKET and buckets[-1] == max_tokens
    for tokens in range(1, max_tokens + 1):
        bucket = next(b for b in buckets if b >= tokens)
        assert bucket - tokens < max(MIN_MIXED_BUCKET, tokens / 4), (tokens, bucket)
    if max_tokens >= 320:
        assert next(b for b in buckets if b >= 287) == 320
    assert len(buckets) <= 4 * max_tokens.bit_length()  # four per doubling: a bounded number of graphs
