"""The cluster index: which node holds which block in which tier, and who is alive.

A plain in-memory structure (no I/O, no locks: the asyncio server owns it from one thread).
``_blocks`` maps a block hash to its (node, tier) holders and ``_by_node`` mirrors it per node,
so dropping a node removes all of its entries in time proportional to what it held.
Invariant (``check_integrity``): the two maps describe the same set of (hash, node, tier).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

from kvbridge.master.messages import LoadReport, NodeInfo, NodeMatch

NodeId = NewType("NodeId", str)
UNKNOWN_NODE = "unknown_node"


class UnknownNode(ValueError):
    def __init__(self, node_id: str) -> None:
        super().__init__(f"node_id: unknown node {node_id!r} (register first)")


@dataclass(slots=True)
class _Node:
    endpoint: str
    load: LoadReport
    last_seen: float


class ClusterIndex:
    """Membership + block index; every mutation names its node, which must be registered."""

    def __init__(self) -> None:
        self._nodes: dict[NodeId, _Node] = {}
        self._blocks: dict[bytes, set[tuple[NodeId, str]]] = {}
        self._by_node: dict[NodeId, set[tuple[bytes, str]]] = {}

    def register(self, node_id: str, endpoint: str, load: LoadReport, now: float,
                 live_s: float = float("inf")) -> bool:
        """Adds a node (True), or refreshes its load if known (False; its entries are kept).
        ValueError when another live node (heard from within ``live_s``) has this id at
        another endpoint: ids must be unique, a second node would steal the first's entries."""
        if not node_id:
            raise ValueError("node_id: must be non-empty")
        node = NodeId(node_id)
        known = self._nodes.get(node)
        if known is not None and known.endpoint != endpoint and now - known.last_seen < live_s:
            raise ValueError(f"node_id: {node_id!r} is already registered by a live node at "
                             f"{known.endpoint} (this one is at {endpoint}); each node needs its own id")
        self._nodes[node] = _Node(endpoint, load, now)
        self._by_node.setdefault(node, set())
        return known is None

    def heartbeat(self, node_id: str, load: LoadReport, now: float) -> None:
        state = self._node(node_id)
        state.load = load
        state.last_seen = now

    def insert(self, node_id: str, tier: str, block_hashes: Sequence[bytes]) -> None:
        self._node(node_id)
        node = NodeId(node_id)
        owned = self._by_node[node]
        for digest in block_hashes:
            self._blocks.setdefault(digest, set()).add((node, tier))
            owned.add((digest, tier))

    def remove(self, node_id: str, tier: str, block_hashes: Sequence[bytes]) -> None:
        """Removes those entries; entries it does not hold are ignored (events may race)."""
        self._node(node_id)
        node = NodeId(node_id)
        for digest in block_hashes:
            self._discard(node, digest, tier)

    def lookup(self, block_hashes: Sequence[bytes]) -> tuple[NodeMatch, ...]:
        """Per node, how many leading blocks of the chain it holds (any tier). Does not modify."""
        counts: dict[NodeId, int] = {}
        alive: set[NodeId] | None = None
        for i, digest in enumerate(block_hashes):
            holders = {node for node, _ in self._blocks.get(digest, ())}
            alive = holders if alive is None else alive & holders
            if not alive:
                break
            for node in alive:
                counts[node] = i + 1
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return tuple(NodeMatch(node, self._nodes[node].endpoint, n) for node, n in ordered)

    def expire(self, now: float, timeout_s: float) -> list[NodeId]:
        """Drops (with all their entries) the nodes silent for more than ``timeout_s``."""
        stale = sorted(n for n, s in self._nodes.items() if now - s.last_seen > timeout_s)
        for node in stale:
            self.drop(node)
        return stale

    def drop(self, node_id: str) -> None:
        node = NodeId(node_id)
        for digest, tier in self._by_node.pop(node, set()):
            holders = self._blocks.get(digest)
            if holders is not None:
                holders.discard((node, tier))
                if not holders:
                    del self._blocks[digest]
        self._nodes.pop(node, None)

    def nodes(self, now: float) -> tuple[NodeInfo, ...]:
        return tuple(
            NodeInfo(node, s.endpoint, s.load, len(self._by_node[node]), max(0.0, now - s.last_seen))
            for node, s in sorted(self._nodes.items())
        )

    @property
    def num_entries(self) -> int:
        return sum(len(entries) for entries in self._by_node.values())

    def check_integrity(self) -> None:
        forward = {(d, n, t) for d, holders in self._blocks.items() for n, t in holders}
        backward = {(d, n, t) for n, owned in self._by_node.items() for d, t in owned}
        if forward != backward:
            raise RuntimeError(f"cluster index: maps disagree on {len(forward ^ backward)} entries")
        if any(not holders for holders in self._blocks.values()):
            raise RuntimeError("cluster index: a block with no holder was kept")
        if set(self._by_node) != set(self._nodes):
            raise RuntimeError("cluster index: entry owners differ from registered nodes")

    def _node(self, node_id: str) -> _Node:
        state = self._nodes.get(NodeId(node_id))
        if state is None:
            raise UnknownNode(node_id)
        return state

    def _discard(self, node: NodeId, digest: bytes, tier: str) -> None:
        holders = self._blocks.get(digest)
        if holders is None or (node, tier) not in holders:
            return
        holders.discard((node, tier))
        if not holders:
            del self._blocks[digest]
        self._by_node[node].discard((digest, tier))
