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

Layers: tiers.py (names, config, stats types, allocators, movers), store_tiers.py (state and
movement between tiers), store_checks.py (statistics, integrity), this module (the request
lifecycle API). Not thread-safe: one owner serializes calls. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvbridge.hashing import BlockHash
from kvbridge.store_checks import StoreChecks
from kvbridge.store_tiers import PinnedChain, Segment, chain_runs
from kvbridge.tiers import StoreMatch, TierName

__all__ = ["BlockStore"]


class BlockStore(StoreChecks):
    """See the module docstring."""

    # ---- queries ----
    def held_blocks(self, request_id: str) -> int:
        """Blocks of the request's chain pinned in active (0 for an unknown request)."""
        req = self._requests.get(request_id)
        return 0 if req is None else len(req.hashes)

    def lookup(self, hashes: Sequence[BlockHash]) -> StoreMatch:
        """Longest prefix of ``hashes`` held in any tier. Modifies nothing."""
        tiers: list[TierName] = []
        slots: list[int] = []
        for seg in self._segments(list(hashes)):
            tiers.extend([seg.tier] * (seg.end - seg.start))
            slots.extend(seg.slots)
        return StoreMatch(len(slots), tuple(tiers), tuple(slots))

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
                self._take_out(seg.tier, chain[: seg.end], seg.start)
                self._move_in("active", seg.end - seg.start)
            if seg.tier == "cold":
                cold_runs.append((len(parts), seg.slots))
            parts.append(seg.slots)
        # Promote only once every matched block left its tier: demotions made for room
        # must not evict a block of this match.
        for index, cold_slots in cold_runs:
            parts[index] = self._promote(cold_slots)
        slots = [s for part in parts for s in part]
        self._requests[request_id] = PinnedChain([], None)
        if slots:
            self._pin(request_id, chain[: len(slots)], slots, None)
        return slots

    def _fit(self, segments: list[Segment]) -> list[Segment]:
        """Cuts the match so promoted cold blocks fit: moving n hot/cold blocks of the match
        leaves free + (hot blocks - hot in match) slots for the cold ones, so the condition
        is (hot + cold blocks in the match) <= free + hot blocks."""
        budget = self.hot_pool.num_free + self._trees["hot"].num_blocks
        out: list[Segment] = []
        for seg in segments:
            size = seg.end - seg.start
            if seg.tier != "active":
                size = min(size, budget)
                budget -= size
            if size == 0:
                break
            out.append(Segment(seg.tier, seg.start, seg.start + size, seg.slots[:size]))
            if seg.start + size < seg.end:
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
        for run in chain_runs(freed):
            self._insert_run("hot", run, [b.value for b in run])
        self._move_out("active", len(freed))
        excess = self._trees["hot"].num_blocks - self.config.hot_capacity_blocks
        if excess > 0:
            self._demote(excess)
        return len(freed)
