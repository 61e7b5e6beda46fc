"""Building blocks of the tiered block store: config, statistics, slot allocation, movers.

Tier names (``TierName``, ``TIERS``) belong to the radix index (kvbridge.radix), where the
tier is a property of a node.

The store never touches KV bytes itself: slots come from a ``BlockAllocator`` per pool (the
*hot* pool holds the active and hot tiers, the *cold* pool the cold tier; kvbridge.pool's
SlotAllocator fits), and a ``BlockMover`` copies block data between pools on demotion and
promotion. Imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Literal, NewType, Protocol

from kvbridge.radix import RadixEvent, TierName

__all__ = [
    "BlockAllocator", "BlockMover", "InMemorySlotAllocator", "NullMover", "PoolName", "RequestId",
    "StoreConfig", "StoreMatch", "StoreStats", "TierCounters", "TierEvent", "TierStats",
]  # fmt: skip

PoolName = Literal["hot", "cold"]
RequestId = NewType("RequestId", str)


class BlockAllocator(Protocol):
    """Slot ids of one block pool; ``allocate`` returns None (not an error) when too few."""

    @property
    def num_slots(self) -> int: ...
    @property
    def num_free(self) -> int: ...
    def allocate(self, n: int) -> list[int] | None: ...
    def free(self, ids: Iterable[int]) -> None: ...


class InMemorySlotAllocator:
    """FIFO free list of slot ids 0..num_slots-1 (lowest first); for tests and index-only use."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self._num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._used: set[int] = set()

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(self._free):
            return None
        slots = [self._free.popleft() for _ in range(n)]
        self._used.update(slots)
        return slots

    def free(self, ids: Iterable[int]) -> None:
        slots = list(ids)
        bad = [s for s in slots if s not in self._used]
        if bad or len(set(slots)) != len(slots):
            raise ValueError(f"free of slots not allocated: {bad or slots}")
        self._used.difference_update(slots)
        self._free.extend(slots)


class BlockMover(Protocol):
    """Copies block data between pools: all layers of src_slots[i] into dst_slots[i]."""

    def copy(
        self, src: PoolName, src_slots: Sequence[int], dst: PoolName, dst_slots: Sequence[int]
    ) -> None: ...


class NullMover:
    """For an index-only store (no KV bytes anywhere)."""

    def copy(
        self, src: PoolName, src_slots: Sequence[int], dst: PoolName, dst_slots: Sequence[int]
    ) -> None:
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class StoreConfig:
    """Capacities in blocks; ``block_nbytes`` (all layers of one block) feeds byte counters."""

    hot_capacity_blocks: int
    cold_capacity_blocks: int = 0
    block_nbytes: int = 0
    eviction_policy: str = "lru"

    def __post_init__(self) -> None:
        for name in ("hot_capacity_blocks", "cold_capacity_blocks", "block_nbytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, slots=True)
class TierStats:
    """Counters of one tier. Per acquire, a tier scores a hit when it served >= 1 block, else
    a miss (so hits + misses == acquires). Bytes count blocks entering/leaving the tier.
    ``demotions`` counts hot blocks moved to cold, ``promotions`` cold blocks moved up,
    ``evictions`` blocks dropped from the store by this tier."""

    num_blocks: int
    capacity_blocks: int
    hits: int
    misses: int
    hit_blocks: int
    bytes_in: int
    bytes_out: int
    evictions: int
    demotions: int
    promotions: int


@dataclasses.dataclass(slots=True)
class TierCounters:
    """Mutable counters behind TierStats; owned by the store."""

    hits: int = 0
    misses: int = 0
    hit_blocks: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0

    def snapshot(self, num_blocks: int, capacity_blocks: int) -> TierStats:
        return TierStats(num_blocks, capacity_blocks, self.hits, self.misses, self.hit_blocks,
                         self.bytes_in, self.bytes_out, self.evictions, self.demotions,
                         self.promotions)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class StoreStats:
    active: TierStats
    hot: TierStats
    cold: TierStats


@dataclasses.dataclass(frozen=True, slots=True)
class StoreMatch:
    """A lookup result: per matched block its tier and its slot in that tier's pool."""

    num_blocks: int
    tiers: tuple[TierName, ...]
    slots: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class TierEvent:
    """A radix event of one tier's index, forwarded to the store's listener (the master)."""

    tier: TierName
    event: RadixEvent
