"""Tiered block store: exact tier contents, demotion/promotion, statistics, integrity."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbridge.hashing import BlockHash, hash_blocks
from kvbridge.radix import BlockRemoved, BlockStored
from kvbridge.store import BlockStore
from kvbridge.tiers import (
    InMemorySlotAllocator,
    PoolName,
    StoreConfig,
    StoreMatch,
    TierEvent,
    TierStats,
)

NBYTES = 10


def chain(*tokens: int) -> list[BlockHash]:
    return hash_blocks(list(tokens), 1)


A = chain(1, 2, 3, 4)
B = chain(1, 2, 7, 8)
C = chain(5, 6)


class ListMover:
    """Real block data for tests: one Python object per slot of each pool."""

    def __init__(self, hot_slots: int, cold_slots: int) -> None:
        self.data: dict[PoolName, list[object]] = {
            "hot": [None] * hot_slots,
            "cold": [None] * cold_slots,
        }

    def copy(
        self, src: PoolName, src_slots: Sequence[int], dst: PoolName, dst_slots: Sequence[int]
    ) -> None:
        for s, d in zip(src_slots, dst_slots, strict=True):
            self.data[dst][d] = self.data[src][s]


class Fixture:
    def __init__(self, hot_slots: int, hot_cap: int, cold_slots: int, cold_cap: int) -> None:
        self.events: list[TierEvent] = []
        self.mover = ListMover(hot_slots, cold_slots)
        self.store = BlockStore(
            StoreConfig(hot_cap, cold_cap, NBYTES),
            InMemorySlotAllocator(hot_slots),
            InMemorySlotAllocator(cold_slots),
            self.mover,
            self.events.append,
        )

    def put(self, request_id: str, hashes: list[BlockHash]) -> list[int]:
        """Computes (writes) and publishes blocks, as the engine hooks do."""
        slots = self.store.allocate_slots(len(hashes))
        assert slots is not None
        for slot, h in zip(slots, hashes, strict=True):
            self.mover.data["hot"][slot] = h
        self.store.publish(request_id, hashes, slots)
        self.store.check_integrity()
        return slots

    def view(self, hashes: list[BlockHash]) -> tuple[tuple[str, ...], tuple[int, ...]]:
        m = self.store.lookup(hashes)
        return m.tiers, m.slots


def test_publish_release_moves_blocks_from_active_to_hot() -> None:
    f = Fixture(hot_slots=8, hot_cap=8, cold_slots=0, cold_cap=0)
    assert f.put("r1", A) == [0, 1, 2, 3]
    assert f.view(A) == (("active",) * 4, (0, 1, 2, 3))
    assert f.store.held_blocks("r1") == 4
    assert f.store.release("r1") == 4
    f.store.check_integrity()
    assert f.view(A) == (("hot",) * 4, (0, 1, 2, 3))
    assert f.store.release("r1") == 0
    assert [e.tier for e in f.events] == ["active", "active", "hot"]
    assert f.events[-1].event == BlockStored(tuple(A), None)


def test_shared_prefix_stays_active_until_its_last_holder_releases() -> None:
    f = Fixture(hot_slots=8, hot_cap=8, cold_slots=0, cold_cap=0)
    f.put("r1", A)
    assert f.store.acquire("r2", B) == [0, 1]
    f.put("r2", B[2:])
    assert f.store.release("r1") == 2
    f.store.check_integrity()
    assert f.view(A) == (("active", "active", "hot", "hot"), (0, 1, 2, 3))
    assert f.store.release("r2") == 4
    f.store.check_integrity()
    assert f.view(A) == (("hot",) * 4, (0, 1, 2, 3))
    assert f.view(B) == (("hot",) * 4, (0, 1, 4, 5))
    slots = dict(zip(A + B[2:], [0, 1, 2, 3, 4, 5], strict=True))
    assert dict(f.store.blocks("hot")) == slots  # one tree: a2..a3 and b2..b3 under a1


def test_acquire_moves_hot_blocks_into_active_and_back() -> None:
    f = Fixture(hot_slots=8, hot_cap=8, cold_slots=0, cold_cap=0)
    f.put("r1", A)
    f.store.release("r1")
    assert f.store.acquire("r2", A[:2] + C) == [0, 1]
    f.store.check_integrity()
    assert f.view(A) == (("active", "active", "hot", "hot"), (0, 1, 2, 3))
    with pytest.raises(ValueError, match="request_id 'r2' is already registered; release it first"):
        f.store.acquire("r2", A)
    f.store.release("r2")
    f.store.check_integrity()
    assert f.view(A) == (("hot",) * 4, (0, 1, 2, 3))


def test_demotion_to_cold_and_cold_eviction_are_exact() -> None:
    f = Fixture(hot_slots=6, hot_cap=2, cold_slots=3, cold_cap=3)
    f.put("r1", A)
    f.store.release("r1")  # 4 blocks into hot (cap 2): a3, a2 demote to cold slots 0, 1
    f.store.check_integrity()
    assert f.view(A) == (("hot", "hot", "cold", "cold"), (0, 1, 0, 1))
    assert f.put("r2", C) == [4, 5]
    f.store.release("r2")  # hot holds a0 a1 c0 c1: LRU a1, a0 demote; cold drops a3 for room
    f.store.check_integrity()
    assert f.view(A) == (("cold",) * 3, (2, 1, 0))
    assert f.view(C) == (("hot", "hot"), (4, 5))
    assert [f.mover.data["cold"][s] for s in (2, 1, 0)] == A[:3]
    removed = [e for e in f.events if e.tier == "cold" and isinstance(e.event, BlockRemoved)]
    assert removed == [TierEvent("cold", BlockRemoved((A[3],)))]
    stats = f.store.stats()
    assert stats.hot == TierStats(2, 2, 0, 0, 0, 60, 40, 0, 4, 0)
    assert stats.cold == TierStats(3, 3, 0, 0, 0, 40, 10, 1, 0, 0)


def test_cold_hit_promotes_into_the_hot_pool() -> None:
    f = Fixture(hot_slots=6, hot_cap=2, cold_slots=3, cold_cap=3)
    f.put("r1", A)
    f.store.release("r1")
    f.put("r2", C)
    f.store.release("r2")
    slots = f.store.acquire("r3", A)
    f.store.check_integrity()
    assert slots == [2, 3, 0]
    assert [f.mover.data["hot"][s] for s in slots] == A[:3]
    assert f.view(A) == (("active",) * 3, (2, 3, 0))
    assert list(f.store.blocks("cold")) == []
    stats = f.store.stats()
    assert stats.cold == TierStats(0, 3, 1, 0, 3, 40, 40, 1, 0, 3)
    assert (stats.hot.hits, stats.hot.misses, stats.active.misses) == (0, 1, 1)
    assert stats.active.bytes_in == 4 * NBYTES + 3 * NBYTES + 2 * NBYTES


def test_a_chain_across_tiers_moves_to_active_with_exact_events() -> None:
    f = Fixture(hot_slots=6, hot_cap=2, cold_slots=3, cold_cap=3)
    f.put("r1", A)
    f.store.release("r1")
    assert f.view(A) == (("hot", "hot", "cold", "cold"), (0, 1, 0, 1))
    f.events.clear()
    assert f.store.acquire("r2", A) == [0, 1, 4, 5]
    assert f.events == [
        TierEvent("hot", BlockRemoved(tuple(A[:2]))),
        TierEvent("cold", BlockRemoved(tuple(A[2:]))),
        TierEvent("active", BlockStored(tuple(A), None)),
    ]
    assert [f.mover.data["hot"][s] for s in (0, 1, 4, 5)] == A
    f.store.check_integrity()


def test_promotion_demotes_hot_blocks_to_make_room() -> None:
    f = Fixture(hot_slots=4, hot_cap=4, cold_slots=4, cold_cap=4)
    f.put("r1", C)
    f.store.release("r1")  # C in hot, slots 0 1
    f.put("r2", A)  # needs 4 slots: 2 free + C demoted to cold (slots 0 1)
    assert f.view(C) == (("cold", "cold"), (0, 1))
    assert f.view(A) == (("active",) * 4, (2, 3, 0, 1))
    f.store.release("r2")  # A to hot
    # a3, a2 demote to cold slots 2 3 and free hot slots 0 1, which receive C
    assert f.store.acquire("r3", C) == [0, 1]
    f.store.check_integrity()
    assert f.view(A) == (("hot", "hot", "cold", "cold"), (2, 3, 2, 3))
    assert [f.mover.data["hot"][s] for s in (0, 1)] == C


def test_promotion_is_cut_where_the_hot_pool_cannot_make_room() -> None:
    f = Fixture(hot_slots=4, hot_cap=4, cold_slots=4, cold_cap=4)
    f.put("r1", A)
    f.store.release("r1")
    f.put("r2", C)  # demotes a3, a2 to cold
    assert f.store.acquire("r3", C[:1]) == [2]  # shares c0 (C took the slots a2 a3 freed)
    assert f.view(A) == (("hot", "hot", "cold", "cold"), (0, 1, 0, 1))
    # 0 free hot slots; a0 a1 (hot) move to active, nothing left to demote for a2.
    assert f.store.acquire("r4", A) == [0, 1]
    f.store.check_integrity()
    assert f.view(A) == (("active", "active", "cold", "cold"), (0, 1, 0, 1))


def test_publish_of_a_stored_block_keeps_the_stored_copy() -> None:
    f = Fixture(hot_slots=8, hot_cap=8, cold_slots=0, cold_cap=0)
    f.put("r1", A)
    f.store.release("r1")
    assert f.put("r2", A[:2]) == [4, 5]  # a0 a1 already in hot: slots 4 5 are freed
    assert f.view(A) == (("active", "active", "hot", "hot"), (0, 1, 2, 3))
    f.put("r3", A[:1])
    f.store.release("r2")
    f.store.release("r3")
    f.store.check_integrity()
    assert f.view(A) == (("hot",) * 4, (0, 1, 2, 3))


def test_slot_contract_errors() -> None:
    f = Fixture(hot_slots=2, hot_cap=2, cold_slots=0, cold_cap=0)
    slots = f.store.allocate_slots(2)
    assert slots == [0, 1]
    assert f.store.allocate_slots(1) is None
    f.store.check_integrity()
    with pytest.raises(ValueError, match="slots: expected 1 slots, got 2"):
        f.store.publish("r", A[:1], slots)
    with pytest.raises(ValueError, match=r"slots \[7\] were not handed out by allocate_slots"):
        f.store.publish("r", A[:1], [7])
    f.store.abandon_slots(slots)
    f.store.check_integrity()
    with pytest.raises(ValueError, match="hot_capacity_blocks 3 exceeds the hot pool's 2 slots"):
        BlockStore(StoreConfig(3), InMemorySlotAllocator(2))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32))
def test_store_random_lifecycles_keep_integrity_and_data(seed: int) -> None:
    rng = random.Random(seed)
    ops = [
        (rng.choice(["put", "acquire", "release"]), rng.randint(0, 3),
         [rng.randint(0, 2) for _ in range(rng.randint(1, 5))])
        for _ in range(40)
    ]  # fmt: skip
    f = Fixture(hot_slots=8, hot_cap=2, cold_slots=4, cold_cap=4)
    held: dict[str, list[BlockHash]] = {}
    for op, rid_num, tokens in ops:
        rid, hashes = f"r{rid_num}", hash_blocks(tokens, 1)
        mine = held.get(rid, [])
        if op == "release":
            f.store.release(rid)
            held.pop(rid, None)
        elif op == "acquire" and rid not in held:
            got = f.store.acquire(rid, hashes)
            assert [f.mover.data["hot"][s] for s in got] == hashes[: len(got)]
            held[rid] = hashes[: len(got)]
        elif op == "put" and len(mine) < len(hashes) and hashes[: len(mine)] == mine:
            slots = f.store.allocate_slots(len(hashes) - len(mine))
            if slots is not None:
                for slot, h in zip(slots, hashes[len(mine) :], strict=True):
                    f.mover.data["hot"][slot] = h
                f.store.publish(rid, hashes[len(mine) :], slots)
                held[rid] = hashes
        f.store.check_integrity()
        assert {r: f.store.held_blocks(r) for r in held} == {r: len(h) for r, h in held.items()}
        for tier_name in ("active", "hot"):
            for h, slot in f.store.blocks(tier_name):  # type: ignore[arg-type]
                assert f.mover.data["hot"][slot] == h
        for h, slot in f.store.blocks("cold"):
            assert f.mover.data["cold"][slot] == h


def test_store_runs_on_the_shared_memory_pool_allocator() -> None:
    from kvbridge.slots import SlotAllocator

    hot, cold = SlotAllocator(4), SlotAllocator(4)
    store = BlockStore(StoreConfig(2, 4), hot, cold)
    slots = store.allocate_slots(4)
    assert slots == [0, 1, 2, 3]
    store.publish("r", A, slots)
    assert store.release("r") == 4  # a3, a2 demote to cold slots 0 1; hot slots 2 3 freed
    assert store.lookup(A) == StoreMatch(4, ("hot", "hot", "cold", "cold"), (0, 1, 0, 1))
    store.check_integrity()
    hot.check_integrity()
    cold.check_integrity()
    assert (hot.num_free, cold.num_free) == (2, 2)
