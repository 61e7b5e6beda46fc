"""Same-host pull by KV handle: pin through the block server, copy from the shared pool, unpin.

The producer's node serves its pool (``TcpTransport.serve_pool``); its block server is the
handle's ``source_endpoint``. ``start_recv`` sends PinRequest over a pooled connection and
waits for PinGranted (which names the pool to map); ``wait_layer`` copies layers straight
from the producer's blocks into the destination runs (one copy); the last layer's copy, or
``close()``, sends Unpin and returns the connection to the pool. A failed pull closes its
connection, which unpins on the server side; an abandoned pin expires at its deadline. The
pin names the slots' generations (``spec.source_gens``): slots freed and reused since the
handle was built fail ``start_recv`` with RemoteError("stale", ...), nothing pinned. With
``spec.num_held`` the pin covers every source slot and only ``spec.moved_slots`` are copied.

Safety: the server unpins only after Unpin, after its deadline, or after shutting the
connection down; so a layer counts as copied only if it was copied before this side's own
(earlier-starting, hence conservative) pin deadline and the connection was still open after
the copy. Otherwise the pull fails (the bytes copied are not to be used).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from kvbridge.errors import (
    KVBridgeError,
    ProtocolError,
    RemoteError,
    TransferTimeout,
    describe_pending,
)
from kvbridge.pool import HostBlockPool, PoolHandle
from kvbridge.protocol import encode_frame, recv_message
from kvbridge.transport.base import LayerBuffers, RecvHandle, TransferSpec
from kvbridge.transport.messages import PinGranted, PinRequest, Unpin
from kvbridge.transport.regions import PoolRegion, copy_layers
from kvbridge.transport.tcp_conn import ConnectionPool, expect_reply


class ShmPullHandle(RecvHandle):
    def __init__(self, spec: TransferSpec, dest: LayerBuffers, *, connections: ConnectionPool,
                 attach: Callable[[PoolHandle], HostBlockPool], timeout_s: float) -> None:
        self.spec = spec
        self.num_layers = spec.num_layers
        self._connections = connections
        self._timeout_s = timeout_s
        self._copied = 0
        self._failed: KVBridgeError | None = None
        self._pin_expires = time.monotonic() + timeout_s  # before the server's: it pins after we send
        sock = connections.acquire(spec.endpoint)
        try:
            sock.settimeout(timeout_s)
            sock.sendall(encode_frame(PinRequest(spec.pool_name, spec.source_slots, timeout_s, spec.source_gens)))
            granted = expect_reply(recv_message(sock), PinGranted)
            if spec.pool_name and granted.pool.name != spec.pool_name:
                raise ProtocolError(f"pinned pool {granted.pool.name!r}, the handle names {spec.pool_name!r}")
            source = PoolRegion.of_pool(attach(granted.pool), spec.moved_slots)
        except BaseException:
            sock.close()  # the server unpins when the connection ends
            raise
        self._sock: socket.socket | None = sock
        self._buffers: tuple[PoolRegion, LayerBuffers] | None = (source, dest)

    def poll(self) -> int:
        return self._copied

    def wait_layer(self, layer: int, deadline: float) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: {layer} out of range [0, {self.num_layers})")
        if self._failed is not None:
            raise self._failed
        start = time.monotonic()
        try:
            if self._copied <= layer:
                self._copy_through(layer, deadline, start)
        except KVBridgeError as exc:
            self._failed = exc.with_traceback(None)
            self.close()
            raise
        if self._copied == self.num_layers:
            self._unpin()

    def _copy_through(self, layer: int, deadline: float, start: float) -> None:
        """Copies layers [copied, layer] in one pass; they count only if the pin held throughout."""
        pending = describe_pending(list(range(self._copied, layer + 1)))
        now = time.monotonic()
        if now >= self._pin_expires:
            raise TransferTimeout(f"shm pull from {self.spec.endpoint}: pin", self._timeout_s, pending)
        if now >= deadline:
            raise TransferTimeout(f"shm pull from {self.spec.endpoint}", max(0.0, deadline - start), pending)
        if self._buffers is None or self._sock is None:
            raise RuntimeError(f"shm pull from {self.spec.endpoint} is closed")
        source, dest = self._buffers
        copy_layers(source, dest, self._copied, layer + 1)
        if time.monotonic() >= self._pin_expires:
            raise TransferTimeout(f"shm pull from {self.spec.endpoint}: pin", self._timeout_s, pending)
        _check_pin_held(self._sock)
        self._copied = layer + 1

    def _unpin(self) -> None:
        sock, self._sock = self._sock, None
        self._buffers = None
        if sock is None:
            return
        try:
            sock.settimeout(1.0)
            sock.sendall(encode_frame(Unpin(len(self.spec.source_slots))))
        except OSError:
            sock.close()
            return
        self._connections.release(self.spec.endpoint, sock)

    def close(self) -> None:
        """Unpins (or drops the connection after a failure) and forgets both pools' views."""
        if self._failed is None:
            self._unpin()
        self._buffers = None
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


def _check_pin_held(sock: socket.socket) -> None:
    """RemoteError when the server ended the pin (it then replied ErrorReply or closed)."""
    sock.setblocking(False)  # with a timeout set, Python would wait for data before peeking
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return
    except OSError as exc:
        raise RemoteError("io", f"block server connection failed while pinned: {exc}") from None
    sock.settimeout(1.0)
    try:
        msg = recv_message(sock)
    except (KVBridgeError, OSError):
        raise RemoteError("aborted", "the block server ended the pin during the copy") from None
    expect_reply(msg, Unpin)  # RemoteError with the server's reason, or ProtocolError
    raise ProtocolError("unexpected Unpin from the block server")
