"""A KV block store with an active tier and a history tier split hot/cold.

- *active*: blocks held by running requests (locked in the active index; never evicted).
- *hot*: finished requests' blocks, still in the hot pool; evicting them *demotes* them to
  cold (data copied by the mover), or drops them when there is no cold tier.
- *cold*: the larger tier in the cold pool; evicting drops blocks (removed events).

A block hash lives in exactly one tier. Active and hot blocks own hot-pool slots, cold blocks
cold-pool slots. ``acquire`` pins a matched prefix into active, promoting cold blocks into the
hot pool (demoting LRU hot blocks to make room); ``release`` moves the request's blocks that no
other request holds into hot. A block is published only after its KV is written. Each tier has
its own radix index (chains split across tiers are anchored segments, see radix.py).

Not thread-safe: one owner serializes calls. Imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from kvbridge.eviction import make_policy
from kvbridge.hashing import BlockHash
from kvbridge.radix import EvictedBlock, Node, RadixEvent, RadixTree
from kvbridge.tiers import (
    TIERS,
    BlockAllocator,
    BlockMover,
    InMemorySlotAllocator,
    NullMover,
    StoreConfig,
    StoreMatch,
    StoreStats,
    TierCounters,
    TierEvent,
    TierName,
)


@dataclasses.dataclass(frozen=True, slots=True)
class _Segment:
    tier: TierName
    start: int
    end: int
    slots: list[int]


@dataclasses.dataclass(slots=True)
class _Request:
    hashes: list[BlockHash]
    node: Node | None


def _runs(evicted: list[EvictedBlock]) -> list[list[EvictedBlock]]:
    """Evicted blocks (deepest first) regrouped into parent-before-child chains."""
    runs: list[list[EvictedBlock]] = []
    for block in reversed(evicted):
        if runs and block.parent_hash == runs[-1][-1].hash:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


class BlockStore:
    """See the module docstring."""

    def __init__(
        self,
        config: StoreConfig,
        hot_pool: BlockAllocator,
        cold_pool: BlockAllocator | None = None,
        mover: BlockMover | None = None,
        listener: Callable[[TierEvent], None] | None = None,
    ) -> None:
        cold_pool = cold_pool or InMemorySlotAllocator(0)
        if config.hot_capacity_blocks > hot_pool.num_slots:
            raise ValueError(
                f"hot_capacity_blocks {config.hot_capacity_blocks} exceeds the hot pool's "
                f"{hot_pool.num_slots} slots"
            )
        if config.cold_capacity_blocks > cold_pool.num_slots:
            raise ValueError(
                f"cold_capacity_blocks {config.cold_capacity_blocks} exceeds the cold pool's "
                f"{cold_pool.num_slots} slots"
            )
        self.config = config
        self.hot_pool, self.cold_pool = hot_pool, cold_pool
        self.mover = mover or NullMover()
        self.listener = listener
        self._trees = {
            t: RadixTree(make_policy(config.eviction_policy), self._forward(t)) for t in TIERS
        }
        self._counters = {t: TierCounters() for t in TIERS}
        self._requests: dict[str, _Request] = {}
        self._pending: set[int] = set()

    def _forward(self, tier: TierName) -> Callable[[RadixEvent], None]:
        def emit(event: RadixEvent) -> None:
            if self.listener is not None:
                self.listener(TierEvent(tier, event))

        return emit

    # ---- queries ----
    def tree(self, tier: TierName) -> RadixTree:
        return self._trees[tier]

    def held_blocks(self, request_id: str) -> int:
        """Blocks of the request's chain pinned in active (0 for an unknown request)."""
        req = self._requests.get(request_id)
        return 0 if req is None else len(req.hashes)

    def lookup(self, hashes: Sequence[BlockHash]) -> StoreMatch:
        """Longest prefix of ``hashes`` held in any tier. Modifies nothing."""
        segments = self._segments(list(hashes))
        tiers: list[TierName] = []
        slots: list[int] = []
        for seg in segments:
            tiers.extend([seg.tier] * (seg.end - seg.start))
            slots.extend(seg.slots)
        return StoreMatch(len(slots), tuple(tiers), tuple(slots))

    def _segments(self, hashes: list[BlockHash]) -> list[_Segment]:
        segments: list[_Segment] = []
        pos = 0
        while pos < len(hashes):
            for tier in TIERS:
                match = self._trees[tier].match_prefix(hashes, pos)
                if match.num_blocks:
                    segments.append(_Segment(tier, pos, pos + match.num_blocks, match.values))
                    pos += match.num_blocks
                    break
            else:
                break
        return segments

    def stats(self) -> StoreStats:
        cap = {"active": self.hot_pool.num_slots, "hot": self.config.hot_capacity_blocks,
               "cold": self.config.cold_capacity_blocks}  # fmt: skip
        snap = {t: self._counters[t].snapshot(self._trees[t].num_blocks, cap[t]) for t in TIERS}
        return StoreStats(snap["active"], snap["hot"], snap["cold"])

    # ---- request lifecycle ----
    def acquire(self, request_id: str, hashes: Sequence[BlockHash]) -> list[int]:
        """Pins the longest stored prefix of ``hashes`` into active for ``request_id`` and
        returns its hot-pool slots (readable until ``release``). Cold blocks are promoted;
        the prefix is cut where promotion would not fit in the hot pool."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already registered; release it first")
        chain = list(hashes)
        segments = self._fit(self._segments(chain))
        self._count_hits(segments)
        cold_runs: list[tuple[int, list[int]]] = []
        parts: list[list[int]] = []
        for seg in segments:
            if seg.tier != "active":
                self._trees[seg.tier].detach(chain[: seg.end], seg.start)
                self._move_out(seg.tier, seg.end - seg.start)
                self._counters["active"].bytes_in += (
                    seg.end - seg.start
                ) * self.config.block_nbytes
            if seg.tier == "cold":
                cold_runs.append((len(parts), seg.slots))
            parts.append(seg.slots)
        for index, cold_slots in cold_runs:
            parts[index] = self._promote(cold_slots)
        slots = [s for part in parts for s in part]
        self._requests[request_id] = _Request([], None)
        if slots:
            self._pin(request_id, chain[: len(slots)], slots, None)
        return slots

    def _fit(self, segments: list[_Segment]) -> list[_Segment]:
        """Cuts the match so promoted cold blocks fit: moving n hot/cold blocks of the match
        leaves free + (hot blocks - hot in match) slots for the cold ones, so the condition
        is (hot + cold blocks in the match) <= free + hot blocks."""
        budget = self.hot_pool.num_free + self._trees["hot"].num_blocks
        out: list[_Segment] = []
        for seg in segments:
            size = seg.end - seg.start
            if seg.tier != "active":
                size = min(size, budget)
                budget -= size
            if size == 0:
                break
            out.append(_Segment(seg.tier, seg.start, seg.start + size, seg.slots[:size]))
            if seg.start + size < seg.end:
                break
        return out

    def _count_hits(self, segments: list[_Segment]) -> None:
        served = {t: 0 for t in TIERS}
        for seg in segments:
            served[seg.tier] += seg.end - seg.start
        for tier in TIERS:
            counters = self._counters[tier]
            counters.hit_blocks += served[tier]
            if served[tier]:
                counters.hits += 1
            else:
                counters.misses += 1

    def _promote(self, cold_slots: list[int]) -> list[int]:
        new = self._allocate_hot(len(cold_slots))
        if new is None:
            raise RuntimeError(f"no hot-pool room to promote {len(cold_slots)} blocks after _fit")
        self.mover.copy("cold", cold_slots, "hot", new)
        self.cold_pool.free(cold_slots)
        self._counters["cold"].promotions += len(cold_slots)
        return new

    def allocate_slots(self, num_blocks: int) -> list[int] | None:
        """Hot-pool slots for blocks about to be computed/written, demoting LRU hot blocks to
        make room; None when even an empty hot tier would not make room. The caller writes
        the KV, then ``publish``es them or gives them back with ``abandon_slots``."""
        slots = self._allocate_hot(num_blocks)
        if slots is not None:
            self._pending.update(slots)
        return slots

    def abandon_slots(self, slots: Sequence[int]) -> None:
        """Returns slots from ``allocate_slots`` that will not be published."""
        self._take_pending(slots)
        self.hot_pool.free(slots)

    def publish(self, request_id: str, hashes: Sequence[BlockHash], slots: Sequence[int]) -> None:
        """Appends written blocks to the request's chain (in active, pinned). ``slots`` come
        from ``allocate_slots``; where a block is already stored the stored copy wins and the
        new slot is freed (a cold copy is dropped in favour of the new hot one)."""
        if len(hashes) != len(slots):
            raise ValueError(f"slots: expected {len(hashes)} slots, got {len(slots)}")
        self._take_pending(slots)
        req = self._requests.setdefault(request_id, _Request([], None))
        final: list[int] = []
        for block_hash, slot in zip(hashes, slots, strict=True):
            final.append(self._dedupe(block_hash, slot))
        self._counters["active"].bytes_in += len(hashes) * self.config.block_nbytes
        if hashes:
            parent = req.hashes[-1] if req.hashes else None
            self._pin(request_id, req.hashes + list(hashes), final, parent)

    def _dedupe(self, block_hash: BlockHash, slot: int) -> int:
        if block_hash in self._trees["active"]:
            self.hot_pool.free([slot])
            return self._trees["active"].value_of(block_hash)
        if block_hash in self._trees["hot"]:
            self.hot_pool.free([slot])
            self._move_out("hot", 1)
            return self._trees["hot"].detach([block_hash])[0]
        if block_hash in self._trees["cold"]:
            self.cold_pool.free(self._trees["cold"].detach([block_hash]))
            self._move_out("cold", 1)
        return slot

    def _pin(
        self,
        request_id: str,
        chain: list[BlockHash],
        new_slots: list[int],
        parent: BlockHash | None,
    ) -> None:
        """Indexes chain's last len(new_slots) blocks in active and moves the request's lock
        to the chain's end."""
        active = self._trees["active"]
        new_part = chain[len(chain) - len(new_slots) :]
        active.insert(new_part, new_slots, parent)
        req = self._requests[request_id]
        node = active.split_at(active.match_prefix(chain))
        active.lock(node)
        if req.node is not None:
            active.unlock(req.node)
        req.hashes, req.node = chain, node

    def release(self, request_id: str) -> int:
        """Unpins the request; its blocks no other request holds move to hot (most recently
        used). Returns how many moved. An unknown request is a no-op (returns 0)."""
        req = self._requests.pop(request_id, None)
        if req is None or req.node is None:
            return 0
        active = self._trees["active"]
        active.unlock(req.node)
        freed = active.evict(len(req.hashes))
        if active.match_prefix(req.hashes).num_blocks + len(freed) != len(req.hashes):
            raise RuntimeError(f"release of {request_id!r} freed blocks outside its chain")
        for run in _runs(freed):
            self._trees["hot"].insert(
                [b.hash for b in run], [b.value for b in run], run[0].parent_hash
            )
        self._move_out("active", len(freed))
        self._counters["hot"].bytes_in += len(freed) * self.config.block_nbytes
        excess = self._trees["hot"].num_blocks - self.config.hot_capacity_blocks
        if excess > 0:
            self._demote(excess)
        return len(freed)

    # ---- movement between tiers ----
    def _allocate_hot(self, num_blocks: int) -> list[int] | None:
        short = num_blocks - self.hot_pool.num_free
        if short > self._trees["hot"].num_blocks:
            return None
        if short > 0:
            self._demote(short)
        return self.hot_pool.allocate(num_blocks)

    def _demote(self, num_blocks: int) -> None:
        """Evicts LRU hot blocks into cold (or drops them without a cold tier)."""
        evicted = self._trees["hot"].evict(num_blocks)
        self._move_out("hot", len(evicted))
        for run in _runs(evicted):
            fit = self._make_cold_room(len(run))
            kept, dropped = run[:fit], run[fit:]
            if kept:
                cold_slots = self.cold_pool.allocate(len(kept))
                if cold_slots is None:
                    raise RuntimeError(f"cold pool has no {len(kept)} slots after making room")
                hot_slots = [b.value for b in kept]
                self.mover.copy("hot", hot_slots, "cold", cold_slots)
                self.hot_pool.free(hot_slots)
                self._trees["cold"].insert([b.hash for b in kept], cold_slots, kept[0].parent_hash)
                self._counters["hot"].demotions += len(kept)
                self._counters["cold"].bytes_in += len(kept) * self.config.block_nbytes
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

    def _move_out(self, tier: TierName, num_blocks: int) -> None:
        self._counters[tier].bytes_out += num_blocks * self.config.block_nbytes

    def _take_pending(self, slots: Sequence[int]) -> None:
        unknown = [s for s in slots if s not in self._pending]
        if unknown:
            raise ValueError(f"slots {unknown} were not handed out by allocate_slots")
        self._pending.difference_update(slots)

    # ---- integrity ----
    def check_integrity(self) -> None:
        """RuntimeError unless: free + active + hot + pending == hot pool total; free + cold
        == cold pool total; slots distinct; each hash in one tier; capacities hold; every
        active block is held by a request and every request's chain is pinned."""
        for tree in self._trees.values():
            tree.check_integrity()
        active, hot, cold = (self._trees[t] for t in TIERS)
        hot_slots = [v for _, v in active.blocks()] + [v for _, v in hot.blocks()]
        hot_slots += sorted(self._pending)
        if len(set(hot_slots)) != len(hot_slots):
            raise RuntimeError("a hot-pool slot is used twice")
        if self.hot_pool.num_free + len(hot_slots) != self.hot_pool.num_slots:
            raise RuntimeError(
                f"hot pool: free {self.hot_pool.num_free} + active {active.num_blocks} + hot "
                f"{hot.num_blocks} + pending {len(self._pending)} != {self.hot_pool.num_slots}"
            )
        cold_slots = {v for _, v in cold.blocks()}
        if len(cold_slots) != cold.num_blocks or (
            self.cold_pool.num_free + cold.num_blocks != self.cold_pool.num_slots
        ):
            raise RuntimeError(
                f"cold pool: free {self.cold_pool.num_free} + cold {cold.num_blocks} "
                f"!= {self.cold_pool.num_slots} (or a slot is used twice)"
            )
        self._check_tiers()

    def _check_tiers(self) -> None:
        active, hot, cold = (self._trees[t] for t in TIERS)
        keys = [{h for h, _ in tree.blocks()} for tree in (active, hot, cold)]
        if keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2]:
            raise RuntimeError("a block hash is stored in two tiers")
        if hot.num_blocks > self.config.hot_capacity_blocks:
            raise RuntimeError(f"hot tier holds {hot.num_blocks} blocks over its capacity")
        if cold.num_blocks > self.config.cold_capacity_blocks:
            raise RuntimeError(f"cold tier holds {cold.num_blocks} blocks over its capacity")
        held: set[BlockHash] = set()
        for request_id, req in self._requests.items():
            if active.match_prefix(req.hashes).num_blocks != len(req.hashes):
                raise RuntimeError(f"request {request_id!r}: chain not fully in active")
            if req.hashes and (req.node is None or req.node.key[-1] != req.hashes[-1]):
                raise RuntimeError(f"request {request_id!r}: lock is not at its chain's end")
            held.update(req.hashes)
        if held != keys[0]:
            raise RuntimeError(f"{len(keys[0] - held)} active blocks are held by no request")
