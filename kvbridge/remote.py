"""Cross-node prefix reuse: a prompt's prefix computed on another node (any server of the
cluster) is pulled instead of recomputed (the design's "fetch remote prefix").

- ``RemoteFinder.find`` (a request's submitting thread, never the engine's): asks the master
  which other node holds the longest prefix of the prompt's full blocks, within a deadline of
  milliseconds; a failed or late lookup skips the cluster for ``cooldown_s``, so a dead or hung
  master costs one deadline per cooldown and nothing but reuse.
- ``RemoteRest``: the remote part of a ``PrefixSource`` (pull.py; an engine KVSource, read on
  the engine's import threads): the prompt's first blocks, those this node's store holds, come
  from its pool (pinned by a lease taken on the engine thread), the rest from the remote node:
  on the first layer RemoteRest asks the remote's block server for the slots of the chain
  (``ResolveRequest``), then pulls them by generation like any hand-off (shm on one host, else
  tcp). The remote holding less than the master said, a reused slot, a dead peer or a passed
  deadline raise PullFailed: the consumer recomputes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from kvbridge.errors import KVBridgeError, PullFailed
from kvbridge.handle import KVHandle, KVLayoutSpec
from kvbridge.hashing import BlockHash
from kvbridge.master.client import MasterClient
from kvbridge.master.messages import NodeMatch
from kvbridge.pull import PulledKVSource
from kvbridge.transport.shm import ShmTransport
from kvbridge.transport.tcp import TcpTransport

LOG = logging.getLogger(__name__)
LOOKUP_TIMEOUT_S = 0.05
COOLDOWN_S = 5.0


class RemoteFinder:
    """The master's view for one worker node (``node_id``, excluded from the answers)."""

    def __init__(self, client: MasterClient, node_id: str, cooldown_s: float = COOLDOWN_S) -> None:
        self._client = client
        self._node_id = node_id
        self._cooldown_s = cooldown_s
        self._skip_until = float("-inf")
        self._lock = threading.Lock()
        self.lookups = 0   # started
        self.answered = 0  # the master answered in time
        self.failures = 0  # late or failed

    def find(self, hashes: Sequence[BlockHash]) -> NodeMatch | None:
        """The other node holding the most leading blocks of ``hashes`` (None: no one, or the
        master did not answer in time)."""
        if not hashes or time.monotonic() < self._skip_until:
            return None
        with self._lock:
            self.lookups += 1
            try:
                matches = self._client.lookup(hashes)
            except (KVBridgeError, OSError) as exc:
                self.failures += 1
                self._skip_until = time.monotonic() + self._cooldown_s
                LOG.info("cluster lookup failed (%s); no remote prefixes for %.0f s", exc, self._cooldown_s)
                return None
            self.answered += 1
        others = [m for m in matches if m.node_id != self._node_id and m.num_blocks > 0]
        return max(others, key=lambda m: m.num_blocks, default=None)

    def close(self) -> None:
        self._client.close()


class RemoteRest:
    """The ``open_rest`` of a PrefixSource over a remote prefix: ``chain``'s blocks from
    ``num_local`` on, pulled from ``remote``. Called with the first layer's deadline, it asks the
    remote's block server for the slots of the chain (``ResolveRequest``) and opens a pull of
    the blocks this node lacks, by generation like any hand-off (shm on one host, else tcp).
    The remote holding less than the master said raises PullFailed."""

    def __init__(self, request_id: str, layout: KVLayoutSpec, chain: Sequence[BlockHash], num_local: int,
                 remote: NodeMatch, transports: tuple[ShmTransport, TcpTransport], timeout_s: float) -> None:
        self.request_id, self.layout = request_id, layout
        self.remote = remote
        self._chain, self._num_local = list(chain), num_local
        self._shm, self._tcp = transports
        self._timeout_s = timeout_s

    def __call__(self, deadline: float) -> PulledKVSource:
        timeout_s = max(1e-3, min(self._timeout_s, deadline - time.monotonic()))
        try:
            reply = self._tcp.resolve(self.remote.endpoint, self._chain, timeout_s)
        except (KVBridgeError, OSError) as exc:
            raise PullFailed(f"remote prefix of {self.request_id}: {self.remote.node_id} "
                             f"did not resolve it: {exc}") from exc
        if len(reply.slots) < len(self._chain):
            raise PullFailed(f"remote prefix of {self.request_id}: {self.remote.node_id} holds "
                             f"{len(reply.slots)} of {len(self._chain)} blocks now")
        n, bs = self._num_local, self.layout.block_size
        handle = KVHandle(self.request_id, tuple(self._chain[n:]), (len(self._chain) - n) * bs,
                          self.remote.endpoint, self.remote.node_id, "hot", self.layout, "shm",
                          reply.pool_name, tuple(reply.slots[n:]), tuple(reply.gens[n:]))
        return PulledKVSource(handle, self._shm, self._tcp, self._timeout_s)
