"""Statistics and integrity checks of the block store.

``StoreChecks`` adds to the tier bookkeeping the read-only views of its state: per-tier
statistics (``stats``, fed by ``_count_hits`` on each acquire) and ``check_integrity``, which
states the store's invariants and raises RuntimeError when one is broken. Neither modifies the
store's blocks. Imports no torch.
"""

from __future__ import annotations

from kvbridge.hashing import BlockHash
from kvbridge.store_tiers import Segment, StoreTiers
from kvbridge.tiers import TIERS, StoreStats


class StoreChecks(StoreTiers):
    """Statistics and integrity on top of the tier bookkeeping (see the module docstring)."""

    def stats(self) -> StoreStats:
        cap = {"active": self.hot_pool.num_slots, "hot": self.config.hot_capacity_blocks,
               "cold": self.config.cold_capacity_blocks}  # fmt: skip
        snap = {t: self._counters[t].snapshot(self._trees[t].num_blocks, cap[t]) for t in TIERS}
        return StoreStats(snap["active"], snap["hot"], snap["cold"])

    def _count_hits(self, segments: list[Segment]) -> None:
        """Per tier: one hit when it serves >= 1 block of this acquire, else one miss."""
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
