"""Tier bookkeeping of the block store: where each block lives and how blocks move.

``StoreTiers`` owns the store's state (one radix index per tier, the two slot pools, the
mover, per-tier counters, the requests' pinned chains and the slots handed out but not yet
published) and every move between tiers: finding which tier holds each part of a chain,
taking a run out of a tier, allocating hot-pool slots by demoting LRU hot blocks to cold
(or dropping them without a cold tier), and promoting cold blocks into the hot pool. Every
move keeps the byte counters in step. The public API (store.py) and statistics / integrity
(store_checks.py) build on it. Not thread-safe. Imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from kvbridge.eviction import make_policy
from kvbridge.hashing import BlockHash
from kvbridge.radix import RadixTree
from kvbridge.radix_types import EvictedBlock, Node, RadixEvent
from kvbridge.tiers import (
    TIERS,
    BlockAllocator,
    BlockMover,
    InMemorySlotAllocator,
    NullMover,
    StoreConfig,
    TierCounters,
    TierEvent,
    TierName,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    """chain[start:end] is held by ``tier`` at ``slots`` (of that tier's pool)."""

    tier: TierName
    start: int
    end: int
    slots: list[int]


@dataclasses.dataclass(slots=True)
class PinnedChain:
    """A request's chain in active and the node its lock sits on (None before any block)."""

    hashes: list[BlockHash]
    node: Node | None


def chain_runs(evicted: list[EvictedBlock]) -> list[list[EvictedBlock]]:
    """Evicted blocks (deepest first) regrouped into parent-before-child chains."""
    runs: list[list[EvictedBlock]] = []
    for block in reversed(evicted):
        if runs and block.parent_hash == runs[-1][-1].hash:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


class StoreTiers:
    """State and inter-tier movement of the block store (see the module docstring)."""

    def __init__(
        self,
        config: StoreConfig,
        hot_pool: BlockAllocator,
        cold_pool: BlockAllocator | None = None,
        mover: BlockMover | None = None,
        listener: Callable[[TierEvent], None] | None = None,
    ) -> None:
        cold_pool = cold_pool or InMemorySlotAllocator(0)
        for name, capacity, pool_name, pool in (
            ("hot_capacity_blocks", config.hot_capacity_blocks, "hot", hot_pool),
            ("cold_capacity_blocks", config.cold_capacity_blocks, "cold", cold_pool),
        ):
            if capacity > pool.num_slots:
                raise ValueError(
                    f"{name} {capacity} exceeds the {pool_name} pool's {pool.num_slots} slots"
                )
        self.config = config
        self.hot_pool, self.cold_pool = hot_pool, cold_pool
        self.mover = mover or NullMover()
        self.listener = listener
        self._trees = {
            t: RadixTree(make_policy(config.eviction_policy), self._forward(t)) for t in TIERS
        }
        self._counters = {t: TierCounters() for t in TIERS}
        self._requests: dict[str, PinnedChain] = {}
        self._pending: set[int] = set()

    def _forward(self, tier: TierName) -> Callable[[RadixEvent], None]:
        def emit(event: RadixEvent) -> None:
            if self.listener is not None:
                self.listener(TierEvent(tier, event))

        return emit

    def tree(self, tier: TierName) -> RadixTree:
        return self._trees[tier]

    def _segments(self, hashes: list[BlockHash]) -> list[Segment]:
        """The longest stored prefix of ``hashes`` as consecutive per-tier segments."""
        segments: list[Segment] = []
        pos = 0
        while pos < len(hashes):
            for tier in TIERS:
                match = self._trees[tier].match_prefix(hashes, pos)
                if match.num_blocks:
                    segments.append(Segment(tier, pos, pos + match.num_blocks, match.values))
                    pos += match.num_blocks
                    break
            else:
                break
        return segments

    # ---- taking blocks out of a tier ----
    def _take_out(self, tier: TierName, hashes: Sequence[BlockHash], start: int = 0) -> list[int]:
        """Detaches hashes[start:] from ``tier`` (no slot is freed); returns their slots."""
        slots = self._trees[tier].detach(hashes, start)
        self._move_out(tier, len(slots))
        return slots

    def _drop_copy(self, block_hash: BlockHash, slot: int) -> int:
        """The slot ``block_hash`` is to use in active given its newly written ``slot``: a copy
        already in active or hot wins (``slot`` is freed, a hot copy leaves hot); a cold copy
        is dropped in favour of ``slot``."""
        if block_hash in self._trees["active"]:
            self.hot_pool.free([slot])
            return self._trees["active"].value_of(block_hash)
        if block_hash in self._trees["hot"]:
            self.hot_pool.free([slot])
            return self._take_out("hot", [block_hash])[0]
        if block_hash in self._trees["cold"]:
            self.cold_pool.free(self._take_out("cold", [block_hash]))
        return slot

    # ---- movement between tiers ----
    def _allocate_hot(self, num_blocks: int) -> list[int] | None:
        short = num_blocks - self.hot_pool.num_free
        if short > self._trees["hot"].num_blocks:
            return None
        if short > 0:
            self._demote(short)
        return self.hot_pool.allocate(num_blocks)

    def _promote(self, cold_slots: list[int]) -> list[int]:
        """Copies cold blocks (already taken out of cold) into new hot-pool slots."""
        new = self._allocate_hot(len(cold_slots))
        if new is None:
            raise RuntimeError(f"no hot-pool room to promote {len(cold_slots)} blocks after _fit")
        self.mover.copy("cold", cold_slots, "hot", new)
        self.cold_pool.free(cold_slots)
        self._counters["cold"].promotions += len(cold_slots)
        return new

    def _demote(self, num_blocks: int) -> None:
        """Evicts LRU hot blocks into cold (or drops them without a cold tier)."""
        evicted = self._trees["hot"].evict(num_blocks)
        self._move_out("hot", len(evicted))
        for run in chain_runs(evicted):
            fit = self._make_cold_room(len(run))
            kept, dropped = run[:fit], run[fit:]
            if kept:
                cold_slots = self.cold_pool.allocate(len(kept))
                if cold_slots is None:
                    raise RuntimeError(f"cold pool has no {len(kept)} slots after making room")
                hot_slots = [b.value for b in kept]
                self.mover.copy("hot", hot_slots, "cold", cold_slots)
                self.hot_pool.free(hot_slots)
                self._insert_run("cold", kept, cold_slots)
                self._counters["hot"].demotions += len(kept)
            if dropped:
                self.hot_pool.free([b.value for b in dropped])
                self._counters["hot"].evictions += len(dropped)

    def _make_cold_room(self, num_blocks: int) -> int:
        """Drops LRU cold blocks so up to num_blocks fit; returns how many fit."""
        fit = min(num_blocks, self.config.cold_capacity_blocks)
        cold = self._trees["cold"]
        excess = max(cold.num_blocks + fit - self.config.cold_capacity_blocks,
                     fit - self.cold_pool.num_free)  # fmt: skip
        if excess > 0:
            dropped = cold.evict(excess)
            self.cold_pool.free([b.value for b in dropped])
            self._move_out("cold", len(dropped))
            self._counters["cold"].evictions += len(dropped)
        return min(fit, self.cold_pool.num_free)

    def _insert_run(self, tier: TierName, run: list[EvictedBlock], slots: list[int]) -> None:
        """Indexes a parent-before-child run of evicted blocks in ``tier`` at ``slots``."""
        self._trees[tier].insert([b.hash for b in run], slots, run[0].parent_hash)
        self._move_in(tier, len(run))

    def _move_in(self, tier: TierName, num_blocks: int) -> None:
        self._counters[tier].bytes_in += num_blocks * self.config.block_nbytes

    def _move_out(self, tier: TierName, num_blocks: int) -> None:
        self._counters[tier].bytes_out += num_blocks * self.config.block_nbytes
