"""The orchestrator's view of the cluster through the kvbridge master (for the Supervisor).

``ClusterView.snapshot(prompt_ids)`` hashes the prompt's full blocks (the workers' hashing:
block size and model id as extra key), asks the master for the longest match per node and
for the nodes' load reports (cached for ``nodes_ttl_s``), both for this server's workers
(keyed by model name; other servers' nodes are the workers' business: kvbridge's KVNode). Blocking (run it off the event
loop); any master failure yields an empty snapshot, so planning degrades to load only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from backends.serving.kv_master import connect, local_model
from backends.serving.supervisor import ClusterSnapshot
from kvbridge import KVBridgeError, MasterClient, hash_blocks

LOG = logging.getLogger(__name__)


class ClusterView:
    def __init__(self, client: MasterClient, model_id: str, block_size: int, nodes_ttl_s: float = 0.5) -> None:
        self._client = client
        self._model_id = model_id
        self._block_size = block_size
        self._ttl_s = nodes_ttl_s
        self._queue_len: dict[str, int] = {}
        self._nodes_at = float("-inf")
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, model_id: str, block_size: int) -> ClusterView | None:
        """A view of the master named by KVBRIDGE_MASTER, or None when none is set."""
        client = connect("orchestrator")
        return None if client is None else cls(client, model_id, block_size)

    def snapshot(self, prompt_ids: Sequence[int]) -> ClusterSnapshot:
        hashes = hash_blocks(prompt_ids, self._block_size, self._model_id)
        try:
            matches = self._client.lookup(hashes) if hashes else ()
            queue_len = self._loads()
        except (KVBridgeError, OSError) as exc:
            LOG.info("kvbridge master unavailable for planning: %s", exc)
            return ClusterSnapshot(len(hashes), block_size=self._block_size)
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
        self._client.close()
