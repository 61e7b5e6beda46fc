"""``MasterLink``: one node's registration, heartbeats and index updates at the master.

It registers the node, sends heartbeats with its load report, and forwards the store's radix
events (batch insert on store, removal on eviction) in order from its own thread, so the
store's owner thread never waits on the network. A missing or failing master is logged and
ignored: the node degrades to no cluster index, never stops.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from kvbridge.errors import KVBridgeError
from kvbridge.master.client import MasterClient
from kvbridge.master.messages import LoadReport
from kvbridge.radix import BlockStored
from kvbridge.tiers import TierEvent

LOG = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
CLOSE_TIMEOUT_S = 4.0


class MasterLink:
    """Owns ``client`` and a forwarding thread; ``close()`` joins the thread (bounded) and
    closes the client."""

    def __init__(self, client: MasterClient) -> None:
        self.client = client
        self._events: queue.Queue[TierEvent | None] = queue.Queue()
        self._thread = threading.Thread(target=self._forward, name="pd-kv-master", daemon=True)
        self._thread.start()

    def start(self, endpoint: str, load: Callable[[], LoadReport]) -> None:
        try:
            self.client.register(endpoint, load())
        except (KVBridgeError, OSError) as exc:  # the heartbeat thread registers again later
            LOG.warning("kvbridge master registration of %s failed: %s", self.client.node_id, exc)
        self.client.start_heartbeats(HEARTBEAT_S, load)

    def on_event(self, event: TierEvent) -> None:
        """The store's listener (its owner thread): queue only."""
        self._events.put(event)

    def _forward(self) -> None:
        while (event := self._events.get()) is not None:
            hashes = list(event.event.hashes)
            try:
                if isinstance(event.event, BlockStored):
                    self.client.insert(event.tier, hashes)
                else:
                    self.client.remove(event.tier, hashes)
            except (KVBridgeError, OSError) as exc:
                LOG.info("kvbridge master update from %s failed: %s", self.client.node_id, exc)

    def close(self) -> None:
        self._events.put(None)
        self._thread.join(CLOSE_TIMEOUT_S)
        self.client.close()
