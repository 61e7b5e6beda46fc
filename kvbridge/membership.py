"""A node's membership in the cluster, kept in etcd under the node's own lease.

``NodeMembership.join(endpoint)`` grants a lease of ``node_ttl_s`` and creates
``<prefix>/nodes/<node_id>`` = endpoint under it, only if no one holds that key: a second live
node with the same id is refused with ``DuplicateNodeId`` (naming the id and both endpoints)
and leaves etcd as it was. ``keep_alive()`` (the node's heartbeat thread) refreshes the lease
and joins again when it expired (the process was stopped past its TTL). ``leave()`` revokes
the lease: the key goes at once. A node that dies leaves etcd when its lease expires, and the
leading master then drops it and its entries (kvbridge.master.election).
All calls block, each bounded by the etcd client's deadline; etcd failures raise
EtcdUnavailable. Not thread-safe: its owner (a MasterClient) serializes the calls.
"""

from __future__ import annotations

import logging

from kvbridge.errors import KVBridgeError
from kvbridge.etcd import Etcd

LOG = logging.getLogger(__name__)


class DuplicateNodeId(KVBridgeError, ValueError):
    """Another live node holds this node id (a configuration mistake: ids must be unique)."""

    def __init__(self, node_id: str, holder: str, endpoint: str, key: str) -> None:
        super().__init__(f"node_id: {node_id!r} is already registered by a live node at {holder} "
                         f"(this one is at {endpoint}; etcd key {key}); each node needs its own id")
        self.node_id = node_id
        self.holder = holder


class NodeMembership:
    """See the module docstring. ``lease_id`` is None until joined (and after ``leave``)."""

    def __init__(self, etcd: Etcd, node_id: str) -> None:
        if not node_id:
            raise ValueError("node_id: must be non-empty")
        self.etcd = etcd
        self.node_id = node_id
        self.key = etcd.config.node_key(node_id)
        self.lease_id: int | None = None
        self._endpoint: str | None = None

    def join(self, endpoint: str) -> None:
        """Holds the node's key under a fresh lease (no-op while joined at ``endpoint``).
        After a failure, ``keep_alive`` tries again."""
        if self.lease_id is not None and endpoint == self._endpoint:
            return
        self._endpoint = endpoint
        old, self.lease_id = self.lease_id, None
        if old is not None:
            self._revoke_quietly(old)
        lease_id = self.etcd.grant(self.etcd.config.node_ttl_s)
        try:
            created = self.etcd.create(self.key, endpoint, lease_id)
            holder = None if created else self.etcd.get(self.key)
        except KVBridgeError:
            self._revoke_quietly(lease_id)
            raise
        if not created:
            self._revoke_quietly(lease_id)
            raise DuplicateNodeId(self.node_id, holder.value if holder else "(gone since)", endpoint, self.key)
        self.lease_id = lease_id
        LOG.info("kvbridge node %s joined the cluster in etcd (%s, lease %x, ttl %d s)",
                 self.node_id, self.key, lease_id, self.etcd.config.node_ttl_s)

    def keep_alive(self) -> None:
        """Refreshes the lease; joins again (a new lease) when it expired or the last join
        failed. No-op before the first ``join`` and after ``leave``."""
        if self._endpoint is None:
            return
        if self.lease_id is not None:
            if self.etcd.refresh(self.lease_id) > 0:
                return
            LOG.warning("kvbridge node %s: its etcd lease %x expired; joining again", self.node_id, self.lease_id)
            self.lease_id = None
        self.join(self._endpoint)

    def leave(self) -> None:
        """Revokes the lease (the key goes now; a failure leaves it to expire). Idempotent."""
        lease_id, self.lease_id, self._endpoint = self.lease_id, None, None
        if lease_id is not None:
            self._revoke_quietly(lease_id)

    def _revoke_quietly(self, lease_id: int) -> None:
        try:
            self.etcd.revoke(lease_id)
        except KVBridgeError as exc:
            LOG.info("kvbridge node %s: revoking etcd lease %x failed (%s); it expires by itself",
                     self.node_id, lease_id, exc)
