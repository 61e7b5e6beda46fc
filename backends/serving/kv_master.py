"""Workers and orchestrators meeting the kvbridge master.

- ``master_address()``: the master's "host:port" from ``KVBRIDGE_MASTER`` (None: no master);
  ``KVBRIDGE_TOKEN`` is its token. ``start_master_if_needed()`` runs one in-process (loopback,
  free port) and exports KVBRIDGE_MASTER for children unless one is configured.
- Node ids are unique in the cluster: ``worker_node_id(model)`` is ``<server>/<model>#<pid>``,
  ``<server>`` being ``TRITON_PD_SERVER_ID`` or, by default, this host's name and the process
  group of its tritonserver (the stubs and the orchestrator share it), ``<pid>`` the worker
  stub's (a reloaded worker is a new node: it never inherits its predecessor's entries).
  ``local_model(node_id)`` maps a node of this server back to its model name.
- ``MasterLink`` (worker side): registers the node, sends heartbeats with its load report, and
  forwards the store's radix events (batch insert on store, removal on eviction) in order from
  its own thread, so the engine thread never waits on the network. A missing or failing master
  is logged and ignored: serving degrades to no cluster index, never stops.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections.abc import Callable

from kvbridge.errors import KVBridgeError
from kvbridge.master.client import MasterClient
from kvbridge.master.messages import LoadReport
from kvbridge.master.server import MasterConfig, MasterThread
from kvbridge.radix import BlockStored
from kvbridge.tiers import TierEvent

LOG = logging.getLogger(__name__)
MASTER_ENV = "KVBRIDGE_MASTER"
TOKEN_ENV = "KVBRIDGE_TOKEN"
HEARTBEAT_S = 1.0
CLIENT_TIMEOUT_S = 2.0


SERVER_ENV = "TRITON_PD_SERVER_ID"


def server_id() -> str:
    return os.environ.get(SERVER_ENV) or f"{socket.gethostname()}-{os.getpgrp()}"


def worker_node_id(model_name: str) -> str:
    return f"{server_id()}/{model_name}#{os.getpid()}"


def local_model(node_id: str) -> str | None:
    """The model name of ``node_id`` when it is a worker of this server, else None."""
    server, sep, rest = node_id.partition("/")
    if not sep or server != server_id():
        return None
    return rest.rpartition("#")[0] or None


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` → (host, port); ValueError naming KVBRIDGE_MASTER otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{MASTER_ENV}: expected 'host:port', got {value!r}")
    return host, int(port)


def master_address() -> tuple[str, int] | None:
    value = os.environ.get(MASTER_ENV, "")
    return parse_address(value) if value else None


def start_master_if_needed(heartbeat_timeout_s: float = 10.0) -> MasterThread | None:
    """Starts a loopback master (and sets KVBRIDGE_MASTER) unless one is configured; the
    caller closes the returned thread."""
    if master_address() is not None:
        return None
    master = MasterThread(MasterConfig(heartbeat_timeout_s=heartbeat_timeout_s))
    host, port = master.address
    os.environ[MASTER_ENV] = f"{host}:{port}"
    return master


def connect(node_id: str, timeout_s: float = CLIENT_TIMEOUT_S) -> MasterClient | None:
    address = master_address()
    if address is None:
        return None
    return MasterClient(*address, node_id=node_id, token=os.environ.get(TOKEN_ENV), timeout_s=timeout_s)


class MasterLink:
    """One node's registration, heartbeats and index updates; ``close()`` joins its threads."""

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
        """The store's listener (engine thread): queue only."""
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
        self._thread.join(CLIENT_TIMEOUT_S * 2)
        self.client.close()
