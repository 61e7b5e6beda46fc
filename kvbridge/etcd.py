"""etcd, where kvbridge keeps cluster membership and the master's leadership (optional).

``KVBRIDGE_ETCD`` names the etcd endpoints ("host:port[,host:port...]", an ``http://`` prefix
allowed); unset, nothing in kvbridge touches etcd. ``EtcdConfig`` says where etcd is, under
which key prefix kvbridge's keys live and how long one call may take; ``Etcd`` is a small
blocking client over etcd's v3 JSON gateway (the ``etcd3gw`` package, etcd >= 3.4).

Keys (``prefix`` = "/kvbridge" by default):
- ``<prefix>/nodes/<node_id>`` = the node's block-server endpoint, under the node's lease;
- ``<prefix>/masters/<address>`` = "", one per running master, under that master's lease;
- ``<prefix>/master/leader`` = the leading master's address, under the leader's lease.

Every call is bounded: each HTTP request to an endpoint has ``timeout_s`` to connect and as
long to answer; the endpoints are tried in order, starting with the last one that answered.
Any failure to reach etcd raises ``EtcdUnavailable``. Thread-safe (one lock per client).
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kvbridge.auth import is_loopback
from kvbridge.errors import KVBridgeError

LOG = logging.getLogger(__name__)
ETCD_ENV = "KVBRIDGE_ETCD"
DEFAULT_PREFIX = "/kvbridge"
T = TypeVar("T")


class FromEnv(enum.Enum):
    """The default of an ``etcd`` argument: the config KVBRIDGE_ETCD names (or none)."""

    FROM_ENV = "env"


FROM_ENV = FromEnv.FROM_ENV


class EtcdUnavailable(KVBridgeError):
    """No etcd endpoint answered within its deadline (or it answered with an error)."""


def parse_endpoints(value: str) -> tuple[tuple[str, int], ...]:
    """"host:port[,host:port...]" (each may start with http://) → ((host, port), ...);
    ValueError naming KVBRIDGE_ETCD otherwise."""
    endpoints = []
    for item in value.split(","):
        text = item.strip().removeprefix("http://").rstrip("/")
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{ETCD_ENV}: expected 'host:port[,host:port...]', got {value!r}")
        endpoints.append((host.strip("[]"), int(port)))
    return tuple(endpoints)


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """Where etcd is (``endpoints``), kvbridge's key prefix, the deadline of one call
    (``timeout_s``) and the TTL of a node's lease (``node_ttl_s``: a node whose process dies
    leaves the cluster that long after its last keep-alive)."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_PREFIX
    timeout_s: float = 1.0
    node_ttl_s: int = 10

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("endpoints: expected at least one (host, port)")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {self.timeout_s}")
        if self.node_ttl_s < 2:
            raise ValueError(f"node_ttl_s: expected >= 2 (etcd's shortest lease), got {self.node_ttl_s}")
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"prefix: expected '/name' without a trailing '/', got {self.prefix!r}")

    @classmethod
    def parse(cls, value: str) -> EtcdConfig:
        """A config for KVBRIDGE_ETCD's form of ``value`` (other fields: their defaults)."""
        return cls(parse_endpoints(value))

    @classmethod
    def from_env(cls) -> EtcdConfig | None:
        """The config named by KVBRIDGE_ETCD; None when it is unset or empty."""
        value = os.environ.get(ETCD_ENV, "").strip()
        return cls.parse(value) if value else None

    @property
    def on_loopback(self) -> bool:
        """Whether every endpoint is on this host (a single-host cluster)."""
        return all(is_loopback(host) for host, _ in self.endpoints)

    def describe(self) -> str:
        return ",".join(f"{host}:{port}" for host, port in self.endpoints)

    @property
    def leader_key(self) -> str:
        return f"{self.prefix}/master/leader"

    @property
    def nodes_prefix(self) -> str:
        return f"{self.prefix}/nodes/"

    @property
    def masters_prefix(self) -> str:
        return f"{self.prefix}/masters/"

    def node_key(self, node_id: str) -> str:
        return self.nodes_prefix + node_id


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key's value and the lease it lives under (0: none)."""

    value: str
    lease_id: int


class Etcd:
    """A blocking etcd client (see the module docstring); ``close()`` closes its sessions."""

    def __init__(self, config: EtcdConfig, timeout_s: float | None = None) -> None:
        try:
            import etcd3gw  # the optional etcd client: imported only where etcd is configured
            import requests
        except ImportError as exc:
            raise ImportError(f"etcd {config.describe()} is configured ({ETCD_ENV} or --etcd) but its client "
                              f"is missing: pip install etcd3gw ({exc})") from exc

        self.config = config
        self._timeout_s = min(config.timeout_s, timeout_s or config.timeout_s)
        self._clients: list[Any] = []
        for host, port in config.endpoints:
            session = requests.Session()
            session.trust_env = False  # never route etcd through a proxy from the environment
            self._clients.append(etcd3gw.client(host=host, port=port, timeout=self._timeout_s,
                                                api_path="/v3/", session=session))
        self._errors: tuple[type[BaseException], ...] = (etcd3gw.exceptions.Etcd3Exception,
                                                         requests.RequestException, ValueError, KeyError)
        self._first = 0
        self._lock = threading.Lock()

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """``fn(client)`` on the first endpoint that answers (the last good one first)."""
        failures = []
        with self._lock:
            for i in range(len(self._clients)):
                index = (self._first + i) % len(self._clients)
                try:
                    result = fn(self._clients[index])
                except self._errors as exc:
                    host, port = self.config.endpoints[index]
                    failures.append(f"{host}:{port}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                self._first = index
                return result
        raise EtcdUnavailable(f"etcd {what} failed within {self._timeout_s:.3f}s per endpoint: "
                              + "; ".join(failures))

    def grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; its id."""
        return int(self._call("lease grant", lambda c: c.lease(ttl_s).id))

    def refresh(self, lease_id: int) -> int:
        """Keeps the lease alive; its remaining TTL in seconds, <= 0 when it has expired."""
        from etcd3gw.lease import Lease

        return int(self._call("lease keep-alive", lambda c: Lease(lease_id, c).refresh()))

    def revoke(self, lease_id: int) -> None:
        """Ends the lease now; etcd deletes every key under it."""
        from etcd3gw.lease import Lease

        self._call("lease revoke", lambda c: Lease(lease_id, c).revoke())

    def create(self, key: str, value: str, lease_id: int) -> bool:
        """Puts ``key`` under the lease only if it does not exist; False when it does."""
        from etcd3gw.lease import Lease

        return bool(self._call("create", lambda c: c.create(key, value, lease=Lease(lease_id, c))))

    def put(self, key: str, value: str, lease_id: int) -> None:
        from etcd3gw.lease import Lease

        self._call("put", lambda c: c.put(key, value, lease=Lease(lease_id, c)))

    def get(self, key: str) -> KeyValue | None:
        found = self._call("get", lambda c: c.get(key, metadata=True))
        if not found:
            return None
        value, meta = found[0]
        return KeyValue(value.decode(), int(meta.get("lease", 0)))

    def get_prefix(self, prefix: str) -> dict[str, KeyValue]:
        """Every key under ``prefix``, by the rest of its name."""
        found = self._call("get prefix", lambda c: c.get_prefix(prefix))
        return {meta["key"].decode()[len(prefix):]: KeyValue(value.decode(), int(meta.get("lease", 0)))
                for value, meta in found}

    def close(self) -> None:
        for client in self._clients:
            client.session.close()
