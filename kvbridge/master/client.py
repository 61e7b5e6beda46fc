"""MasterClient: a blocking client of the master with per-request timeouts.

One socket, one request in flight at a time (a lock serializes callers, including the
heartbeat thread). A timeout or a broken connection closes the socket; the next request
reconnects. A remote rejection raises RemoteError (code ``unknown_node`` when the node must
register again: the heartbeat thread does that by itself).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from kvbridge.auth import Hello, HelloAck
from kvbridge.errors import KVBridgeError, ProtocolError, RemoteError, TransferTimeout
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
from kvbridge.protocol import ErrorReply, Ok, expect_message, recv_message, send_message

log = logging.getLogger(__name__)
R = TypeVar("R")


class MasterClient:
    """Talks to one master as ``node_id`` (any name for clients that only look up)."""

    def __init__(
        self, host: str, port: int, *, node_id: str, token: str | None = None, timeout_s: float = 5.0
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        self.address = (host, port)
        self.node_id = node_id
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
        self._endpoint = endpoint
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
            try:
                sock = self._connected()
                send_message(sock, msg)
                reply = recv_message(sock)
            except TimeoutError:
                self._drop_connection()
                raise TransferTimeout(
                    f"master request {type(msg).__name__} to {self.address}", self._timeout_s, "reply"
                ) from None
            except (OSError, ProtocolError):
                self._drop_connection()
                raise
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message)
        return expect_message(reply, reply_cls)

    def _connected(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
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

    def close(self) -> None:
        """Stops the heartbeat thread (joins it) and closes the socket. Idempotent."""
        self._stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(self._timeout_s + 1.0)
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> MasterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
