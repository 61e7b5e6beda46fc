"""Master election on etcd: several masters, one leads; the others stand by and take over.

Each master holds one etcd lease of ``ttl_s`` seconds, under which it keeps
``<prefix>/masters/<address>`` (it runs) and, when it wins, ``<prefix>/master/leader`` =
its address. ``Election.step()`` is one round, run every ``ttl_s / 3`` by the master's
campaign task: keep the lease alive (a new lease when it expired), try to create the leader
key (it succeeds only when no one holds it), and read who leads. A leader that is killed stops
refreshing; etcd deletes its keys when its lease expires, and a standby's next round wins.
A leader that cannot reach etcd keeps leading only while its lease may still be alive
(``lease_alive``): past that another master may lead, so it stands down.
Blocking calls, each bounded by the etcd client's deadline; EtcdUnavailable when etcd does
not answer. One caller thread at a time.

``current_leader(etcd)`` is what clients ask: the leader's (host, port), or None;
``live_nodes`` and ``running_masters`` what a status shows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kvbridge.errors import KVBridgeError
from kvbridge.etcd import Etcd, KeyValue

LOG = logging.getLogger(__name__)
NOT_LEADER = "not_leader"  # an ErrorReply code: ask etcd who leads and go there


@dataclass(frozen=True, slots=True)
class Role:
    """A round's outcome: whether this master leads, and the leader's address per etcd
    (None: no one leads right now)."""

    leading: bool
    leader: str | None


def parse_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"master address: expected 'host:port', got {value!r}")
    return host.strip("[]"), int(port)


def current_leader(etcd: Etcd) -> tuple[str, int] | None:
    """The leading master's (host, port) per etcd; None when no one leads."""
    found = etcd.get(etcd.config.leader_key)
    return None if found is None else parse_address(found.value)


def live_nodes(etcd: Etcd) -> dict[str, str]:
    """The nodes holding a live lease in etcd: node id → endpoint."""
    return {node: kv.value for node, kv in etcd.get_prefix(etcd.config.nodes_prefix).items()}


def running_masters(etcd: Etcd) -> list[str]:
    """The addresses of the running masters (the leader's included), sorted."""
    return sorted(etcd.get_prefix(etcd.config.masters_prefix))


class Election:
    """One master's candidacy at ``address`` ("host:port", what clients connect to)."""

    def __init__(self, etcd: Etcd, address: str, ttl_s: int) -> None:
        if ttl_s < 2:
            raise ValueError(f"leader ttl_s: expected >= 2 (etcd's shortest lease), got {ttl_s}")
        self.etcd = etcd
        self.address = address
        self.ttl_s = ttl_s
        self.lease_id: int | None = None
        self._alive_since = float("-inf")  # when the last grant/refresh that succeeded was sent

    def step(self) -> Role:
        """One round (see the module docstring)."""
        sent = time.monotonic()
        config = self.etcd.config
        if self.lease_id is not None and self.etcd.refresh(self.lease_id) <= 0:
            LOG.warning("kvbridge master %s: its etcd lease %x expired", self.address, self.lease_id)
            self.lease_id = None
        if self.lease_id is None:
            self.lease_id = self.etcd.grant(self.ttl_s)
            self.etcd.put(config.masters_prefix + self.address, "", self.lease_id)
        self._alive_since = sent
        self.etcd.create(config.leader_key, self.address, self.lease_id)
        leader: KeyValue | None = self.etcd.get(config.leader_key)
        return Role(leader is not None and leader.lease_id == self.lease_id,
                    None if leader is None else leader.value)

    def lease_alive(self, now: float) -> bool:
        """Whether this master's lease may still be alive at ``now`` (its keys still held)."""
        return now - self._alive_since < self.ttl_s

    def members(self) -> dict[str, str]:
        return live_nodes(self.etcd)

    def resign(self) -> None:
        """Revokes the lease: the leader key (if ours) goes now and a standby takes over on its
        next round. A failure leaves the lease to expire. Idempotent."""
        lease_id, self.lease_id = self.lease_id, None
        self._alive_since = float("-inf")
        if lease_id is None:
            return
        try:
            self.etcd.revoke(lease_id)
        except KVBridgeError as exc:
            LOG.info("kvbridge master %s: revoking its etcd lease failed (%s); it expires in %d s",
                     self.address, exc, self.ttl_s)
