"""The orchestrator's view of the cluster through the kvbridge master (for the Supervisor).

``ClusterView.snapshot(prompt_ids)`` hashes the prompt's full blocks (the workers' hashing:
block size and model id as extra key), asks the master for the longest match per node and
for the nodes' load reports (cached for ``nodes_ttl_s``), both for this server's workers
(keyed by model name; other servers' nodes are the workers' business: kvbridge's KVNode).
Blocking; a master failure yields None, so planning degrades to load only.

The request path uses ``await view.within(prompt_ids)``: the lookup runs on the view's own
thread and the request waits at most ``deadline_s`` for it (None after that: the plan is made
from the local view). A lookup the master failed (a timeout, a refused connection) stops
lookups for ``backoff_s``, so a dead or hung master costs requests nothing but reuse; while a
lookup has been in flight for longer than the deadline (a hung master, before its socket times
out) requests do not wait at all; a lookup whose caller already gave up is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from backends.serving.kv_master import connect, local_model
from backends.serving.supervisor import ClusterSnapshot
from kvbridge import KVBridgeError, MasterClient, hash_blocks

LOG = logging.getLogger(__name__)
LOOKUP_DEADLINE_S = 0.1
BACKOFF_S = 2.0


class ClusterView:
    def __init__(self, client: MasterClient, model_id: str, block_size: int, nodes_ttl_s: float = 0.5,
                 deadline_s: float = LOOKUP_DEADLINE_S, backoff_s: float = BACKOFF_S) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s: expected > 0, got {deadline_s}")
        self._client = client
        self._model_id = model_id
        self._block_size = block_size
        self._ttl_s = nodes_ttl_s
        self._deadline_s = deadline_s
        self._backoff_s = backoff_s
        self._queue_len: dict[str, int] = {}
        self._nodes_at = float("-inf")
        self._lock = threading.Lock()
        self._failed_at = float("-inf")
        self._busy_since: float | None = None  # when the lookup in flight started
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pd-cluster")
        self.missed = 0  # lookups that gave the request path no snapshot (failed, late, backing off)

    @classmethod
    def from_env(cls, model_id: str, block_size: int, deadline_s: float = LOOKUP_DEADLINE_S) -> ClusterView | None:
        """A view of the master named by KVBRIDGE_MASTER, or None when none is set."""
        client = connect("orchestrator")
        return None if client is None else cls(client, model_id, block_size, deadline_s=deadline_s)

    async def within(self, prompt_ids: Sequence[int]) -> ClusterSnapshot | None:
        """``snapshot(prompt_ids)`` if the master answers within the deadline, else None (the
        plan is then made as with an empty snapshot: supervisor.is_local / choose_worker)."""
        now = time.monotonic()
        busy_since = self._busy_since
        if now - self._failed_at < self._backoff_s or (busy_since is not None and now - busy_since > self._deadline_s):
            self.missed += 1
            return None
        future = asyncio.get_running_loop().run_in_executor(self._thread, self.snapshot, prompt_ids)
        try:
            snapshot = await asyncio.wait_for(future, self._deadline_s)
        except TimeoutError:
            snapshot = None
        if snapshot is None:
            self.missed += 1
        return snapshot

    def snapshot(self, prompt_ids: Sequence[int]) -> ClusterSnapshot | None:
        """The master's view of the prompt; None when the master failed the lookup."""
        hashes = hash_blocks(prompt_ids, self._block_size, self._model_id)
        self._busy_since = time.monotonic()
        try:
            matches = self._client.lookup(hashes) if hashes else ()
            queue_len = self._loads()
        except (KVBridgeError, OSError) as exc:
            self._failed_at = time.monotonic()
            LOG.info("kvbridge master unavailable for planning (no lookups for %.1f s): %s", self._backoff_s, exc)
            return None
        finally:
            self._busy_since = None
        matched = {model: m.num_blocks for m in matches if (model := local_model(m.node_id))}
        return ClusterSnapshot(len(hashes), queue_len, matched, self._block_size)

    def _loads(self) -> dict[str, int]:
        with self._lock:
            now = time.monotonic()
            if now - self._nodes_at >= self._ttl_s:
                self._queue_len = {model: n.load.queue_len for n in self._client.nodes()
                                   if (model := local_model(n.node_id))}
                self._nodes_at = now
            return self._queue_len

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._client.close()
