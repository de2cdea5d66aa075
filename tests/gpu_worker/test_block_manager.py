"""BlockManager: paged KV block bookkeeping (CPU only, no model)."""
from __future__ import annotations

import pytest

from services.gpu_worker.engine.block_manager import BlockManager


def test_blocks_needed_rounds_up_to_whole_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.blocks_needed([], 0) == 0
    assert bm.blocks_needed([], 1) == 1
    assert bm.blocks_needed([], 4) == 1
    assert bm.blocks_needed([], 5) == 2
    assert bm.blocks_needed([0, 1], 8) == 0
    assert bm.blocks_needed([0, 1], 9) == 1
    assert bm.blocks_needed([0, 1, 2], 5) == 0  # never negative: a table larger than needed adds nothing


def test_grow_adds_a_block_only_when_crossing_a_boundary():
    bm = BlockManager(num_blocks=8, block_size=4)
    table: list[int] = []
    sizes = []
    for num_tokens in range(1, 14):  # one token at a time, as decodes do
        bm.grow(table, num_tokens)
        sizes.append(len(table))
    assert sizes == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert len(set(table)) == len(table)  # distinct blocks
    assert bm.num_free == 8 - 4


def test_grow_in_one_chunk_spanning_several_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    table: list[int] = []
    bm.grow(table, 3)
    assert len(table) == 1
    bm.grow(table, 3 + 10)  # a prefill chunk of 10 tokens crossing three boundaries
    assert len(table) == 4
    assert bm.num_free == 4


def test_two_sequences_never_share_a_block():
    bm = BlockManager(num_blocks=6, block_size=2)
    a: list[int] = []
    b: list[int] = []
    for n in range(1, 7):
        bm.grow(a, n)
        bm.grow(b, n)
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(6))
    assert bm.num_free == 0


def test_exhaustion_can_grow_false_and_grow_raises_without_side_effects():
    bm = BlockManager(num_blocks=3, block_size=4)
    table: list[int] = []
    assert bm.can_grow(table, 12)
    assert not bm.can_grow(table, 13)
    bm.grow(table, 12)
    assert bm.num_free == 0
    assert bm.can_grow(table, 12)  # already holds them
    assert not bm.can_grow(table, 13)
    other: list[int] = []
    assert not bm.can_grow(other, 1)
    with pytest.raises(RuntimeError, match="KV cache exhausted"):
        bm.grow(other, 1)
    with pytest.raises(RuntimeError, match="KV cache exhausted"):
        bm.grow(table, 13)
    assert other == [] and len(table) == 3  # a refused grow takes nothing
    assert bm.num_free == 0


def test_partial_shortfall_raises_and_takes_nothing():
    bm = BlockManager(num_blocks=4, block_size=2)
    held: list[int] = []
    bm.grow(held, 5)  # 3 blocks
    table: list[int] = []
    assert not bm.can_grow(table, 3)  # needs 2, 1 free
    with pytest.raises(RuntimeError):
        bm.grow(table, 3)
    assert table == [] and bm.num_free == 1


def test_free_returns_every_block_and_clears_the_table():
    bm = BlockManager(num_blocks=10, block_size=3)
    tables = [[] for _ in range(3)]
    for t, n in zip(tables, (7, 1, 12)):
        bm.grow(t, n)
    assert bm.num_free == 10 - (3 + 1 + 4)
    for t in tables:
        bm.free(t)
        assert t == []
    assert bm.num_free == bm.num_blocks
    # every block can be handed out again, each exactly once
    big: list[int] = []
    bm.grow(big, 30)
    assert sorted(big) == list(range(10))
    assert bm.num_free == 0


def test_free_twice_is_harmless():
    bm = BlockManager(num_blocks=4, block_size=2)
    table: list[int] = []
    bm.grow(table, 4)
    bm.free(table)
    bm.free(table)  # the table was cleared: nothing is freed twice
    assert bm.num_free == 4
