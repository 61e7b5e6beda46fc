"""MasterClient: a blocking client of the master with per-request timeouts.

One socket, one request in flight at a time (a lock serializes callers, including the
heartbeat thread). A timeout or a broken connection closes the socket; the next request
reconnects. A remote rejection raises RemoteError (code ``unknown_node`` when the node must
register again: the heartbeat thread does that by itself).

With etcd (``etcd``; by default the config KVBRIDGE_ETCD names, none when unset) the client
connects to whichever master leads per etcd, (host, port) being only the fallback when etcd
does not answer; a refused connection, a dropped one or a ``not_leader`` answer is retried
once on the leader etcd names then. ``register`` first joins etcd under the node's lease
(kvbridge.membership: a duplicate live node id raises DuplicateNodeId), the heartbeat thread
keeps the lease alive, ``close`` revokes it. Every etcd call has the etcd client's deadline
(at most this client's ``timeout_s``).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from kvbridge.auth import Hello, HelloAck
from kvbridge.errors import KVBridgeError, ProtocolError, RemoteError, TransferTimeout
from kvbridge.etcd import FROM_ENV, Etcd, EtcdConfig, EtcdUnavailable, FromEnv
from kvbridge.master.election import NOT_LEADER, current_leader
from kvbridge.master.index import UNKNOWN_NODE
from kvbridge.master.messages import (
    Heartbeat,
    InsertBlocks,
    ListNodes,
    LoadReport,
    Lookup,
    LookupReply,
    NodeInfo,
    NodeMatch,
    NodesReply,
    RegisterNode,
    RemoveBlocks,
)
from kvbridge.membership import DuplicateNodeId, NodeMembership
from kvbridge.protocol import ErrorReply, Ok, expect_message, recv_message, send_message

log = logging.getLogger(__name__)
R = TypeVar("R")


class NoLeader(KVBridgeError):
    """etcd answered, and no master leads right now (an election is under way)."""


class MasterClient:
    """Talks to one master as ``node_id`` (any name for clients that only look up)."""

    def __init__(
        self, host: str, port: int, *, node_id: str, token: str | None = None, timeout_s: float = 5.0,
        etcd: EtcdConfig | None | FromEnv = FROM_ENV,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        self.address = (host, port)  # where the last connection went (with etcd: the leader)
        self._configured = (host, port)
        self.node_id = node_id
        etcd_config = EtcdConfig.from_env() if etcd is FROM_ENV else etcd
        self._etcd = Etcd(etcd_config, timeout_s) if isinstance(etcd_config, EtcdConfig) else None
        self._membership = NodeMembership(self._etcd, node_id) if self._etcd is not None else None
        self._member_lock = threading.Lock()
        self._token = token or ""
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._endpoint: str | None = None
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        # called (heartbeat thread) after the master forgot this node and it registered again
        # (the master restarted, or expired it): the owner re-publishes what it holds
        self.on_registered_again: Callable[[], None] | None = None

    # ----- requests

    def register(self, endpoint: str, load: LoadReport | None = None) -> None:
        """Joins etcd first when configured (DuplicateNodeId: another live node has this id)."""
        self._endpoint = endpoint
        if self._membership is not None:
            with self._member_lock:
                self._membership.join(endpoint)
        self._request(RegisterNode(self.node_id, endpoint, load or LoadReport()), Ok)

    def heartbeat(self, load: LoadReport) -> None:
        self._request(Heartbeat(self.node_id, load), Ok)

    def insert(self, tier: str, block_hashes: Sequence[bytes]) -> None:
        self._request(InsertBlocks(self.node_id, tier, tuple(block_hashes)), Ok)

    def remove(self, tier: str, block_hashes: Sequence[bytes]) -> None:
        self._request(RemoveBlocks(self.node_id, tier, tuple(block_hashes)), Ok)

    def lookup(self, block_hashes: Sequence[bytes]) -> tuple[NodeMatch, ...]:
        return self._request(Lookup(tuple(block_hashes)), LookupReply).matches

    def nodes(self) -> tuple[NodeInfo, ...]:
        return self._request(ListNodes(), NodesReply).nodes

    def _request(self, msg: object, reply_cls: type[R]) -> R:
        with self._lock:
            for retry in ((True, False) if self._etcd is not None else (False,)):
                try:
                    reply = self._exchange(msg)
                except TransferTimeout:
                    raise  # the deadline is spent
                except (OSError, ProtocolError):
                    if not retry:
                        raise
                    continue  # the master died or moved: ask etcd again
                if not (retry and isinstance(reply, ErrorReply) and reply.code == NOT_LEADER):
                    break
                self._drop_connection()
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message)
        return expect_message(reply, reply_cls)

    def _exchange(self, msg: object) -> object:
        """One request and its reply (under the lock); a failure drops the connection."""
        try:
            sock = self._connected()
            send_message(sock, msg)
            return recv_message(sock)
        except TimeoutError:
            self._drop_connection()
            raise TransferTimeout(
                f"master request {type(msg).__name__} to {self.address}", self._timeout_s, "reply"
            ) from None
        except (OSError, ProtocolError):
            self._drop_connection()
            raise

    def _connected(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        self.address = self._leader()
        sock = socket.create_connection(self.address, timeout=self._timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            send_message(sock, Hello(self._token, self.node_id))
            reply = recv_message(sock)
            if isinstance(reply, ErrorReply):
                raise RemoteError(reply.code, reply.message)
            expect_message(reply, HelloAck)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return sock

    def _leader(self) -> tuple[str, int]:
        """Where to connect: the leader per etcd; the configured address without etcd or when
        etcd does not answer. NoLeader while etcd says no one leads."""
        if self._etcd is None:
            return self._configured
        try:
            leader = current_leader(self._etcd)
        except EtcdUnavailable as exc:
            log.info("kvbridge %s: etcd did not answer (%s); trying the master at %s:%d",
                     self.node_id, exc, *self._configured)
            return self._configured
        if leader is None:
            raise NoLeader(f"no kvbridge master leads in etcd {self._etcd.config.describe()} right now")
        if leader != self.address:
            log.info("kvbridge %s: the leading master is %s:%d (etcd)", self.node_id, *leader)
        return leader

    def _drop_connection(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ----- background heartbeats

    def start_heartbeats(self, interval_s: float, load_fn: Callable[[], LoadReport]) -> None:
        """Sends a heartbeat every ``interval_s`` until close(); re-registers if dropped."""
        if self._heartbeat_thread is not None:
            raise RuntimeError("heartbeats already started")
        if self._endpoint is None:
            raise RuntimeError("register() before start_heartbeats()")
        thread = threading.Thread(
            target=self._beat, args=(interval_s, load_fn), name=f"kvbridge-heartbeat-{self.node_id}", daemon=True
        )
        self._heartbeat_thread = thread
        thread.start()

    def _beat(self, interval_s: float, load_fn: Callable[[], LoadReport]) -> None:
        while not self._stop.wait(interval_s):
            self._keep_membership()
            try:
                load = load_fn()
                try:
                    self.heartbeat(load)
                except RemoteError as exc:
                    if exc.code != UNKNOWN_NODE or self._endpoint is None:
                        raise
                    self.register(self._endpoint, load)
                    if self.on_registered_again is not None:
                        self.on_registered_again()
            except (KVBridgeError, OSError) as exc:
                log.warning("kvbridge heartbeat from %s failed: %s", self.node_id, exc)

    def _keep_membership(self) -> None:
        """Keeps the node's etcd lease alive (joins again when it expired); logs failures."""
        if self._membership is None:
            return
        try:
            with self._member_lock:
                self._membership.keep_alive()
        except DuplicateNodeId as exc:
            log.error("kvbridge node %s cannot join again: %s", self.node_id, exc)
        except KVBridgeError as exc:
            log.warning("kvbridge node %s: keeping its etcd lease failed: %s", self.node_id, exc)

    def close(self) -> None:
        """Stops the heartbeat thread (joins it), leaves etcd (revokes the node's lease) and
        closes the socket. Idempotent."""
        self._stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(self._timeout_s + 1.0)
        if self._membership is not None:
            with self._member_lock:
                self._membership.leave()
        with self._lock:
            self._drop_connection()
        if self._etcd is not None:
            self._etcd.close()

    def __enter__(self) -> MasterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
