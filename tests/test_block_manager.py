from __future__ import annotations

import pytest

from punica.kv.block_manager import BlockManager, blocks_for


@pytest.mark.parametrize("n,expected", [(0, 0), (1, 1), (15, 1), (16, 1), (17, 2), (31, 2), (32, 2), (33, 3)])
def test_blocks_for_page_boundaries(n, expected):
    assert blocks_for(n, 16) == expected


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 32, 33])
def test_grow_and_free_keep_the_invariant(n):
    bm = BlockManager(num_blocks=8, block_size=16)
    table: list[int] = []
    bm.grow(table, n)
    assert len(table) == blocks_for(n, 16)
    assert bm.num_free + bm.num_used == bm.num_blocks
    bm.grow(table, n + 1)  # one more token crosses into a new block exactly at multiples of 16
    assert len(table) == blocks_for(n + 1, 16)
    assert len(set(table)) == len(table)
    bm.free(table)
    assert table == [] and bm.num_free == 8


def test_grow_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=16)
    a, b = [], []
    bm.grow(a, 33)
    assert not bm.can_grow(b, 17)
    with pytest.raises(MemoryError):
        bm.grow(b, 17)
    assert b == [] and bm.num_free == 0
    bm.free(a)
    bm.grow(b, 17)
    assert bm.num_used == 2


def test_blocks_are_never_shared():
    bm = BlockManager(num_blocks=10, block_size=4)
    tables = [[] for _ in range(5)]
    for step in range(1, 9):
        for t in tables:
            if bm.can_grow(t, step):
                bm.grow(t, step)
    used = [b for t in tables for b in t]
    assert len(used) == len(set(used)) == bm.num_used
