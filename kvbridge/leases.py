"""Leases on published prefill KV: how long a handle's pool slots stay pinned for its consumer.

A prefill's KV is published under a lease: its full blocks are held in the store's active tier
and its partial last block as a pending slot, so nothing can evict or reuse them before the
decode worker pulled them. A lease ends (the blocks go to the history tier, the partial slot is
freed) at the first of: the block server reports that a pull of exactly the handle's slots
ended (``pulled``; called from block-server threads), ``discard`` (the request was cancelled),
or its expiry. ``LeaseTable`` only keeps the books; the node releases what ``due`` returns on
its owner thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import NewType

LeaseId = NewType("LeaseId", str)


@dataclass(frozen=True, slots=True)
class Lease:
    """``slots`` are the handle's block slots in order; ``partial_slot`` the unhashed tail block."""

    lease_id: LeaseId
    request_id: str
    slots: tuple[int, ...]
    partial_slot: int | None
    expires_at: float


class LeaseTable:
    """Open leases. ``add``/``due``/``discard`` from the owner thread; ``pulled`` from any."""

    def __init__(self) -> None:
        self._leases: dict[LeaseId, Lease] = {}
        self._by_slots: dict[tuple[int, ...], deque[LeaseId]] = {}
        self._by_request: dict[str, LeaseId] = {}
        self._pulled: queue.SimpleQueue[tuple[int, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._leases)

    def add(self, lease: Lease) -> None:
        if lease.lease_id in self._leases:
            raise ValueError(f"lease_id: {lease.lease_id!r} is already open")
        with self._lock:
            self._leases[lease.lease_id] = lease
            self._by_slots.setdefault(lease.slots, deque()).append(lease.lease_id)
            self._by_request[lease.request_id] = lease.lease_id

    def pulled(self, slots: tuple[int, ...]) -> None:
        """A pull (or pin) of ``slots`` ended; thread-safe, cheap, never raises."""
        self._pulled.put(slots)

    def discard(self, request_id: str) -> Lease | None:
        """Closes the lease of ``request_id`` (None when it has none) and returns it."""
        lease_id = self._by_request.get(request_id)
        return None if lease_id is None else self._close(lease_id)

    def due(self, now: float | None = None) -> list[Lease]:
        """Closes and returns the leases that were pulled or have expired (oldest first)."""
        closed: list[Lease] = []
        while True:
            try:
                slots = self._pulled.get_nowait()
            except queue.Empty:
                break
            ids = self._by_slots.get(slots)
            if ids:
                lease = self._close(ids[0])
                if lease is not None:
                    closed.append(lease)
        now = time.monotonic() if now is None else now
        for lease in [x for x in self._leases.values() if x.expires_at <= now]:
            if self._close(lease.lease_id) is not None:
                closed.append(lease)
        return closed

    def close_all(self) -> list[Lease]:
        return [lease for lease_id in list(self._leases) if (lease := self._close(lease_id)) is not None]

    def _close(self, lease_id: LeaseId) -> Lease | None:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                return None
            ids = self._by_slots[lease.slots]
            ids.remove(lease_id)
            if not ids:
                del self._by_slots[lease.slots]
            if self._by_request.get(lease.request_id) == lease_id:
                del self._by_request[lease.request_id]
            return lease
