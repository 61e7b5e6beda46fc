"""BlockManager against a naive oracle, plus its error contract."""

from __future__ import annotations

import random

import pytest

from backends.engine.block_manager import BlockId, BlockManager


def test_allocate_order_and_free_list_is_fifo() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    assert bm.allocate(3) == [0, 1, 2]
    bm.free([BlockId(1)])
    assert bm.allocate(2) == [3, 1]
    assert bm.num_free_blocks == 0
    bm.check_integrity()


def test_append_slots_grows_table_to_hold_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    table: list[BlockId] = []
    bm.append_slots(table, 1)
    assert table == [0]
    bm.append_slots(table, 4)
    assert table == [0]
    bm.append_slots(table, 9)
    assert table == [0, 1, 2]
    assert bm.blocks_needed(table, 13) == 1
    assert bm.blocks_needed(table, 2) == 0


def test_errors() -> None:
    with pytest.raises(ValueError, match="num_blocks must be > 0, got 0"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="block_size must be > 0, got -1"):
        BlockManager(num_blocks=1, block_size=-1)
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(RuntimeError, match=r"allocate\(3\) with only 2 free blocks"):
        bm.allocate(3)
    with pytest.raises(RuntimeError, match="double free of block 1"):
        bm.free([BlockId(1)])
    with pytest.raises(RuntimeError, match="share of free block 0"):
        bm.share([BlockId(0)])


def test_randomized_against_oracle() -> None:
    rng = random.Random(1234)
    total = 13
    bm = BlockManager(num_blocks=total, block_size=4)
    refs = {i: 0 for i in range(total)}
    free_order = list(range(total))
    holders: list[list[BlockId]] = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.4:
            n = rng.randint(0, 5)
            assert bm.can_allocate(n) == (n <= len(free_order))
            if n <= len(free_order):
                got = bm.allocate(n)
                expected, free_order = free_order[:n], free_order[n:]
                assert got == expected
                for b in got:
                    refs[b] = 1
                holders.append(got)
        elif op < 0.55 and holders:
            shared = list(rng.choice(holders))
            bm.share(shared)
            for b in shared:
                refs[b] += 1
            holders.append(shared)
        elif holders:
            held = holders.pop(rng.randrange(len(holders)))
            bm.free(held)
            for b in held:
                refs[b] -= 1
                if refs[b] == 0:
                    free_order.append(b)
        bm.check_integrity()
        assert bm.num_free_blocks == len(free_order)
        assert [bm.ref_count(b) for b in range(total)] == [refs[b] for b in range(total)]
    for held in holders:
        bm.free(held)
    bm.check_integrity()
    assert bm.num_free_blocks == total
