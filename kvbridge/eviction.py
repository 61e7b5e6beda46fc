"""Pluggable eviction policies and the lazy priority queue of eviction candidates.

A policy maps a candidate (a radix node) to a priority tuple; the smallest is evicted first.
Priorities are read from a monotonic logical clock, never wall time, so eviction order is
exact and reproducible. The queue is a binary heap with lazy invalidation: re-pushing a node
supersedes its older entries, ``discard`` forgets it, and ``pop`` skips stale entries and
entries whose node the owner no longer considers evictable.

Imports no torch.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class EvictionCandidate(Protocol):
    """What a policy may read from a node: all fields are logical-clock ticks or ids."""

    @property
    def uid(self) -> int: ...
    @property
    def last_access(self) -> int: ...
    @property
    def created_at(self) -> int: ...


class EvictionPolicy(Protocol):
    """Orders candidates; the smallest priority is evicted first. Must be deterministic."""

    name: str

    def priority(self, node: EvictionCandidate) -> tuple[int, ...]: ...


class LRUPolicy:
    """Least recently used first; ties broken by node uid (older node first)."""

    name = "lru"

    def priority(self, node: EvictionCandidate) -> tuple[int, ...]:
        return (node.last_access, node.uid)


class FIFOPolicy:
    """First inserted first; accesses do not matter."""

    name = "fifo"

    def priority(self, node: EvictionCandidate) -> tuple[int, ...]:
        return (node.created_at, node.uid)


def make_policy(name: str) -> EvictionPolicy:
    """The policy registered under ``name`` ('lru' or 'fifo')."""
    if name == "lru":
        return LRUPolicy()
    if name == "fifo":
        return FIFOPolicy()
    raise ValueError(f"eviction policy must be 'lru' or 'fifo', got {name!r}")


N = TypeVar("N", bound=EvictionCandidate)


class EvictionQueue(Generic[N]):
    """Lazy min-heap of candidates keyed by policy priority.

    The owner pushes a node whenever it becomes evictable or its priority changes, and
    discards it when the node dies. Only the latest push of a node is live.
    """

    def __init__(self, policy: EvictionPolicy) -> None:
        self.policy = policy
        self._heap: list[tuple[tuple[int, ...], int, N]] = []
        self._live: dict[int, tuple[tuple[int, ...], int]] = {}
        self._next_stamp = 0

    def push(self, node: N) -> None:
        priority = self.policy.priority(node)
        self._next_stamp += 1
        self._live[node.uid] = (priority, self._next_stamp)
        heapq.heappush(self._heap, (priority, self._next_stamp, node))
        if len(self._heap) > 4 * len(self._live) + 1024:
            self._compact()

    def discard(self, node: N) -> None:
        self._live.pop(node.uid, None)

    def pop(self, is_evictable: Callable[[N], bool]) -> N | None:
        """Removes and returns the best live evictable node, or None when there is none."""
        while self._heap:
            priority, stamp, node = heapq.heappop(self._heap)
            if self._live.get(node.uid) != (priority, stamp):
                continue
            del self._live[node.uid]
            if is_evictable(node):
                return node
        return None

    def live_entry(self, node: N) -> tuple[int, ...] | None:
        """Priority of the node's live entry (None when it has none); for integrity checks."""
        entry = self._live.get(node.uid)
        return None if entry is None else entry[0]

    def live_uids(self) -> Iterator[int]:
        return iter(self._live)

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._live.get(e[2].uid) == (e[0], e[1])]
        heapq.heapify(self._heap)
