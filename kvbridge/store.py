"""A KV block store with an active tier and a history tier split hot/cold, over one radix tree.

- *active*: blocks held by running requests (locked in the index; never evicted).
- *hot*: finished requests' blocks, still in the hot pool; evicting them *demotes* them to
  cold (data copied by the mover), or drops them when there is no cold tier.
- *cold*: the larger tier in the cold pool; evicting drops blocks (removed events).

One radix index (kvbridge.radix) holds every block; the tier is a property of its node, so a
chain split across tiers is one path in one tree. A block hash lives in exactly one tier.
Active and hot blocks own hot-pool slots, cold blocks cold-pool slots. ``acquire`` pins a
matched prefix into active, promoting cold blocks into the hot pool (demoting LRU hot blocks to
make room); ``release`` moves the request's blocks that no other request holds into hot. A
block moves between tiers by leaving the index and being inserted again in its new tier, so
listeners see it removed from one tier and stored in the other. A block is published only
after its KV is written. The store never touches KV bytes itself: slots come from a
``BlockAllocator`` per pool and a ``BlockMover`` copies data (tiers.py). Every move keeps the
per-tier byte counters in step.

Not thread-safe: one owner serializes calls. Imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

from kvbridge.eviction import make_policy
from kvbridge.hashing import BlockHash
from kvbridge.radix import TIERS, EvictedBlock, Node, RadixEvent, RadixTree, TierName, TierRun
from kvbridge.tiers import (
    BlockAllocator,
    BlockMover,
    InMemorySlotAllocator,
    NullMover,
    StoreConfig,
    StoreMatch,
    StoreStats,
    TierCounters,
    TierEvent,
)

__all__ = ["BlockStore"]


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
        self._index = RadixTree(make_policy(config.eviction_policy), tier_listener=self._forward)
        self._counters = {t: TierCounters() for t in TIERS}
        self._requests: dict[str, PinnedChain] = {}
        self._pending: set[int] = set()

    def _forward(self, tier: TierName, event: RadixEvent) -> None:
        if self.listener is not None:
            self.listener(TierEvent(tier, event))

    # ---- queries ----
    def held_blocks(self, request_id: str) -> int:
        """Blocks of the request's chain pinned in active (0 for an unknown request)."""
        req = self._requests.get(request_id)
        return 0 if req is None else len(req.hashes)

    def lookup(self, hashes: Sequence[BlockHash]) -> StoreMatch:
        """Longest prefix of ``hashes`` held in any tier. Modifies nothing."""
        tiers: list[TierName] = []
        slots: list[int] = []
        for run in self._index.match_tiers(hashes):
            tiers.extend([run.tier] * (run.end - run.start))
            slots.extend(run.values)
        return StoreMatch(len(slots), tuple(tiers), tuple(slots))

    def blocks(self, tier: TierName) -> Iterator[tuple[BlockHash, int]]:
        """Every (hash, slot) ``tier`` holds, in no particular order. Modifies nothing."""
        return self._index.blocks(tier)

    # ---- request lifecycle ----
    def acquire(self, request_id: str, hashes: Sequence[BlockHash]) -> list[int]:
        """Pins the longest stored prefix of ``hashes`` into active for ``request_id`` and
        returns its hot-pool slots (readable until ``release``). Cold blocks are promoted;
        the prefix is cut where promotion would not fit in the hot pool."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already registered; release it first")
        chain = list(hashes)
        runs = self._fit(self._index.match_tiers(chain))
        self._count_hits(runs)
        cold_runs: list[tuple[int, list[int]]] = []
        parts: list[list[int]] = []
        for run in runs:
            if run.tier != "active":
                self._take_out(run.tier, chain[: run.end], run.start)
                self._move_in("active", run.end - run.start)
            if run.tier == "cold":
                cold_runs.append((len(parts), run.values))
            parts.append(run.values)
        # Promote only once every matched block left its tier: demotions made for room
        # must not evict a block of this match.
        for index, cold_slots in cold_runs:
            parts[index] = self._promote(cold_slots)
        slots = [s for part in parts for s in part]
        self._requests[request_id] = PinnedChain([], None)
        if slots:
            self._pin(request_id, chain[: len(slots)], slots, None)
        return slots

    def _fit(self, runs: list[TierRun]) -> list[TierRun]:
        """Cuts the match so promoted cold blocks fit: moving n hot/cold blocks of the match
        leaves free + (hot blocks - hot in match) slots for the cold ones, so the condition
        is (hot + cold blocks in the match) <= free + hot blocks."""
        budget = self.hot_pool.num_free + self._index.num_blocks_in("hot")
        out: list[TierRun] = []
        for run in runs:
            size = run.end - run.start
            if run.tier != "active":
                size = min(size, budget)
                budget -= size
            if size == 0:
                break
            out.append(TierRun(run.tier, run.start, run.start + size, run.values[:size]))
            if run.start + size < run.end:
                break
        return out

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
        req = self._requests.setdefault(request_id, PinnedChain([], None))
        final = [self._drop_copy(h, s) for h, s in zip(hashes, slots, strict=True)]
        self._move_in("active", len(hashes))
        if hashes:
            parent = req.hashes[-1] if req.hashes else None
            self._pin(request_id, req.hashes + list(hashes), final, parent)

    def _take_pending(self, slots: Sequence[int]) -> None:
        unknown = [s for s in slots if s not in self._pending]
        if unknown:
            raise ValueError(f"slots {unknown} were not handed out by allocate_slots")
        self._pending.difference_update(slots)

    def _pin(
        self,
        request_id: str,
        chain: list[BlockHash],
        new_slots: list[int],
        parent: BlockHash | None,
    ) -> None:
        """Indexes chain's last len(new_slots) blocks in active and moves the request's lock
        to the chain's end."""
        index = self._index
        new_part = chain[len(chain) - len(new_slots) :]
        index.insert(new_part, new_slots, parent, "active")
        req = self._requests[request_id]
        node = index.split_at(index.match_prefix(chain))
        index.lock(node)
        if req.node is not None:
            index.unlock(req.node)
        req.hashes, req.node = chain, node

    def release(self, request_id: str) -> int:
        """Unpins the request; its blocks no other request holds move to hot (most recently
        used). Returns how many moved. An unknown request is a no-op (returns 0)."""
        req = self._requests.pop(request_id, None)
        if req is None or req.node is None:
            return 0
        self._index.unlock(req.node)
        freed = self._index.evict(len(req.hashes), "active")
        if self._active_prefix(req.hashes) + len(freed) != len(req.hashes):
            raise RuntimeError(f"release of {request_id!r} freed blocks outside its chain")
        for run in chain_runs(freed):
            self._insert_run("hot", run, [b.value for b in run])
        self._move_out("active", len(freed))
        excess = self._index.num_blocks_in("hot") - self.config.hot_capacity_blocks
        if excess > 0:
            self._demote(excess)
        return len(freed)

    def _active_prefix(self, hashes: list[BlockHash]) -> int:
        """How many leading blocks of ``hashes`` are in active."""
        runs = self._index.match_tiers(hashes)
        return runs[0].end if runs and runs[0].tier == "active" else 0

    # ---- movement between tiers ----
    def _take_out(self, tier: TierName, hashes: Sequence[BlockHash], start: int = 0) -> list[int]:
        """Detaches hashes[start:] (held by ``tier``; no slot is freed); returns their slots."""
        slots = self._index.detach(hashes, start)
        self._move_out(tier, len(slots))
        return slots

    def _drop_copy(self, block_hash: BlockHash, slot: int) -> int:
        """The slot ``block_hash`` is to use in active given its newly written ``slot``: a copy
        already in active or hot wins (``slot`` is freed, a hot copy leaves hot); a cold copy
        is dropped in favour of ``slot``."""
        tier = self._index.tier_of(block_hash)
        if tier == "active":
            self.hot_pool.free([slot])
            return self._index.value_of(block_hash)
        if tier == "hot":
            self.hot_pool.free([slot])
            return self._take_out("hot", [block_hash])[0]
        if tier == "cold":
            self.cold_pool.free(self._take_out("cold", [block_hash]))
        return slot

    def _allocate_hot(self, num_blocks: int) -> list[int] | None:
        short = num_blocks - self.hot_pool.num_free
        if short > self._index.num_blocks_in("hot"):
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
        evicted = self._index.evict(num_blocks, "hot")
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
        num_cold = self._index.num_blocks_in("cold")
        excess = max(num_cold + fit - self.config.cold_capacity_blocks,
                     fit - self.cold_pool.num_free)  # fmt: skip
        if excess > 0:
            dropped = self._index.evict(excess, "cold")
            self.cold_pool.free([b.value for b in dropped])
            self._move_out("cold", len(dropped))
            self._counters["cold"].evictions += len(dropped)
        return min(fit, self.cold_pool.num_free)

    def _insert_run(self, tier: TierName, run: list[EvictedBlock], slots: list[int]) -> None:
        """Indexes a parent-before-child run of evicted blocks in ``tier`` at ``slots``."""
        self._index.insert([b.hash for b in run], slots, run[0].parent_hash, tier)
        self._move_in(tier, len(run))

    def _move_in(self, tier: TierName, num_blocks: int) -> None:
        self._counters[tier].bytes_in += num_blocks * self.config.block_nbytes

    def _move_out(self, tier: TierName, num_blocks: int) -> None:
        self._counters[tier].bytes_out += num_blocks * self.config.block_nbytes

    # ---- statistics, integrity (read-only) ----
    def stats(self) -> StoreStats:
        cap = {"active": self.hot_pool.num_slots, "hot": self.config.hot_capacity_blocks,
               "cold": self.config.cold_capacity_blocks}  # fmt: skip
        snap = {t: self._counters[t].snapshot(self._index.num_blocks_in(t), cap[t]) for t in TIERS}
        return StoreStats(snap["active"], snap["hot"], snap["cold"])

    def _count_hits(self, runs: list[TierRun]) -> None:
        """Per tier: one hit when it serves >= 1 block of this acquire, else one miss."""
        served = dict.fromkeys(TIERS, 0)
        for run in runs:
            served[run.tier] += run.end - run.start
        for tier in TIERS:
            counters = self._counters[tier]
            counters.hit_blocks += served[tier]
            if served[tier]:
                counters.hits += 1
            else:
                counters.misses += 1

    def check_integrity(self) -> None:
        """RuntimeError unless: the index is consistent (each hash in one node, so in one
        tier); free + active + hot + pending == hot pool total; free + cold == cold pool
        total; slots distinct; capacities hold; every active block is held by a request and
        every request's chain is pinned."""
        index = self._index
        index.check_integrity()
        num_active, num_hot, num_cold = (index.num_blocks_in(t) for t in TIERS)
        hot_slots = [v for _, v in index.blocks("active")] + [v for _, v in index.blocks("hot")]
        hot_slots += sorted(self._pending)
        if len(set(hot_slots)) != len(hot_slots):
            raise RuntimeError("a hot-pool slot is used twice")
        if self.hot_pool.num_free + len(hot_slots) != self.hot_pool.num_slots:
            raise RuntimeError(
                f"hot pool: free {self.hot_pool.num_free} + active {num_active} + hot "
                f"{num_hot} + pending {len(self._pending)} != {self.hot_pool.num_slots}"
            )
        cold_slots = {v for _, v in index.blocks("cold")}
        if len(cold_slots) != num_cold or (
            self.cold_pool.num_free + num_cold != self.cold_pool.num_slots
        ):
            raise RuntimeError(
                f"cold pool: free {self.cold_pool.num_free} + cold {num_cold} "
                f"!= {self.cold_pool.num_slots} (or a slot is used twice)"
            )
        if num_hot > self.config.hot_capacity_blocks:
            raise RuntimeError(f"hot tier holds {num_hot} blocks over its capacity")
        if num_cold > self.config.cold_capacity_blocks:
            raise RuntimeError(f"cold tier holds {num_cold} blocks over its capacity")
        self._check_requests()

    def _check_requests(self) -> None:
        held: set[BlockHash] = set()
        for request_id, req in self._requests.items():
            if self._active_prefix(req.hashes) != len(req.hashes):
                raise RuntimeError(f"request {request_id!r}: chain not fully in active")
            node = req.node
            if req.hashes and (node is None or not node.alive or node.key[-1] != req.hashes[-1]):
                raise RuntimeError(f"request {request_id!r}: lock is not at its chain's end")
            held.update(req.hashes)
        active = {h for h, _ in self._index.blocks("active")}
        if held != active:
            raise RuntimeError(f"{len(active - held)} active blocks are held by no request")
