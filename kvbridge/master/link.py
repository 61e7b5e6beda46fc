"""``MasterLink``: one node's registration, heartbeats and index updates at the master.

It registers the node, sends heartbeats with its load report, and forwards the store's radix
events (batch insert on store, removal on eviction) in order from its own thread, so the
store's owner thread never waits on the network. A missing or failing master is logged and
ignored: the node degrades to no cluster index, never stops. When the master has forgotten the
node (it restarted, or expired the node) and the heartbeat thread registers it again, the
forwarding thread re-publishes every block the store holds, per tier (``holdings``), in order
with the events: inserts and removes are idempotent at the master, so events queued around
the snapshot leave the index as the store is, including inserts made while the master was down.
With etcd, the client follows the leading master, so a new leader hears the re-publish.
The one registration failure that is not ignored: DuplicateNodeId (another live node has this
node's id) propagates from ``start``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from kvbridge.errors import KVBridgeError
from kvbridge.master.client import MasterClient
from kvbridge.master.messages import LoadReport
from kvbridge.membership import DuplicateNodeId
from kvbridge.radix import BlockStored
from kvbridge.tiers import TierEvent

LOG = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
CLOSE_TIMEOUT_S = 4.0
REPUBLISH_BATCH = 4096  # hashes per insert message when re-publishing (32 B each)
_REPUBLISH = object()
Holdings = Callable[[], Sequence[tuple[str, Sequence[bytes]]]]  # (tier, block hashes) per tier


class MasterLink:
    """Owns ``client`` and a forwarding thread; ``close()`` joins the thread (bounded) and
    closes the client."""

    def __init__(self, client: MasterClient, holdings: Holdings = lambda: ()) -> None:
        self.client = client
        self._holdings = holdings
        self._events: queue.Queue[TierEvent | object | None] = queue.Queue()
        client.on_registered_again = self.republish
        self._thread = threading.Thread(target=self._forward, name="pd-kv-master", daemon=True)
        self._thread.start()

    def start(self, endpoint: str, load: Callable[[], LoadReport]) -> None:
        try:
            self.client.register(endpoint, load())
        except DuplicateNodeId:
            raise
        except (KVBridgeError, OSError) as exc:  # the heartbeat thread registers again later
            LOG.warning("kvbridge master registration of %s failed: %s", self.client.node_id, exc)
        self.client.start_heartbeats(HEARTBEAT_S, load)

    def on_event(self, event: TierEvent) -> None:
        """The store's listener (its owner thread): queue only."""
        self._events.put(event)

    def republish(self) -> None:
        """Queue a re-publish of everything the store holds (any thread)."""
        self._events.put(_REPUBLISH)

    def _forward(self) -> None:
        while (event := self._events.get()) is not None:
            try:
                if event is _REPUBLISH:
                    self._republish()
                elif isinstance(event, TierEvent) and isinstance(event.event, BlockStored):
                    self.client.insert(event.tier, list(event.event.hashes))
                elif isinstance(event, TierEvent):
                    self.client.remove(event.tier, list(event.event.hashes))
            except (KVBridgeError, OSError) as exc:
                LOG.info("kvbridge master update from %s failed: %s", self.client.node_id, exc)

    def _republish(self) -> None:
        total = 0
        for tier, hashes in self._holdings():
            for start in range(0, len(hashes), REPUBLISH_BATCH):
                self.client.insert(tier, list(hashes[start:start + REPUBLISH_BATCH]))
            total += len(hashes)
        LOG.info("kvbridge node %s registered again: re-published %d blocks", self.client.node_id, total)

    def close(self) -> None:
        self._events.put(None)
        self._thread.join(CLOSE_TIMEOUT_S)
        self.client.close()
