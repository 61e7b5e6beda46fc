"""Cross-node prefix reuse: a prompt's prefix computed on another node (any server of the
cluster) is pulled instead of recomputed (the design's "fetch remote prefix").

- ``RemoteFinder.find`` (a request's submitting thread, never the engine's): asks the master
  which other node holds the longest prefix of the prompt's full blocks, within a deadline of
  milliseconds; a failed or late lookup skips the cluster for ``cooldown_s``, so a dead or hung
  master costs one deadline per cooldown and nothing but reuse.
- ``PrefixSource`` (an engine KVSource, read on the engine's import threads): the prompt's first
  blocks, those this node's store holds copied from its pool (pinned by a lease taken on the
  engine thread), the rest pulled from the remote node: on its first layer it asks the remote's
  block server for the slots of the chain (``ResolveRequest``), then pulls them by generation
  like any hand-off (shm on one host, else tcp). The remote holding less than the master said, a
  reused slot, a dead peer or a passed deadline raise PullFailed: the consumer recomputes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

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
        self.lookups = 0
        self.failures = 0

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
        others = [m for m in matches if m.node_id != self._node_id and m.num_blocks > 0]
        return max(others, key=lambda m: m.num_blocks, default=None)

    def close(self) -> None:
        self._client.close()


class PrefixSource:
    """KVSource for ``len(local_slots) + len(remote_hashes)`` full blocks of a prompt (see the
    module docstring). ``close()`` (engine thread) ends the pull and releases the local lease."""

    def __init__(self, request_id: str, layout: KVLayoutSpec, pool: Any, local_slots: Sequence[int],
                 chain: Sequence[BlockHash], remote: NodeMatch, transports: tuple[ShmTransport, TcpTransport],
                 timeout_s: float, release: Callable[[], None],
                 on_done: Callable[[str], None] | None = None) -> None:
        self.request_id, self.layout = request_id, layout
        self.num_local = len(local_slots)
        self.num_tokens = len(chain) * layout.block_size
        self.remote = remote
        self.elapsed_ns = 0
        self.num_pulled_bytes = (len(chain) - self.num_local) * layout.block_bytes * layout.num_layers
        self._pool, self._local_slots = pool, list(local_slots)
        self._chain = list(chain)
        self._shm, self._tcp = transports
        self._timeout_s = timeout_s
        self._release: Callable[[], None] | None = release
        self._on_done = on_done
        self._pull: PulledKVSource | None = None
        self._start_ns = 0

    def read_layer(self, layer: int, dst: torch.Tensor, deadline: float) -> None:
        if layer == 0:
            self._start_ns = time.perf_counter_ns()
            self._pull = self._open_pull(deadline)
        n = self.num_local
        if n:
            rows = np.ascontiguousarray(self._pool.layer(layer)[self._local_slots])
            dst[:n].copy_(torch.from_numpy(rows).view(dst.dtype).view(dst[:n].shape))
        if self._pull is None:
            raise PullFailed(f"remote prefix of {self.request_id} is closed")
        self._pull.read_layer(layer, dst[n:], deadline)
        if layer == self.layout.num_layers - 1:
            self.elapsed_ns = time.perf_counter_ns() - self._start_ns
            if self._on_done is not None:
                self._on_done("remote")

    def _open_pull(self, deadline: float) -> PulledKVSource:
        """Resolves the chain on the remote node and opens a pull of the blocks we lack."""
        timeout_s = max(1e-3, min(self._timeout_s, deadline - time.monotonic()))
        try:
            reply = self._tcp.resolve(self.remote.endpoint, self._chain, timeout_s)
        except (KVBridgeError, OSError) as exc:
            raise PullFailed(f"remote prefix of {self.request_id}: {self.remote.node_id} "
                                f"did not resolve it: {exc}") from exc
        if len(reply.slots) < len(self._chain):
            raise PullFailed(f"remote prefix of {self.request_id}: {self.remote.node_id} holds "
                                f"{len(reply.slots)} of {len(self._chain)} blocks now")
        n, bs = self.num_local, self.layout.block_size
        handle = KVHandle(self.request_id, tuple(self._chain[n:]), (len(self._chain) - n) * bs,
                          self.remote.endpoint, self.remote.node_id, "hot", self.layout, "shm",
                          reply.pool_name, tuple(reply.slots[n:]), tuple(reply.gens[n:]))
        return PulledKVSource(handle, self._shm, self._tcp, self._timeout_s)

    def close(self) -> None:
        """Ends the pull and releases the local blocks' lease (engine thread); idempotent."""
        pull, self._pull = self._pull, None
        if pull is not None:
            pull.close()
        release, self._release = self._release, None
        if release is not None:
            release()
