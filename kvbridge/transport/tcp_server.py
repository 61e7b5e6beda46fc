"""The block server: the producer side of the tcp transport (one per node).

Serves two kinds of pulls: a *published transfer* (registered by ``start_send``; layers go
out as the producer publishes them) and *pool slots* (already-written blocks of the pool
given to ``serve_pool``, e.g. a decode pulling a finished prefill's KV by handle). Slots of a
pool pull are pinned in the pool's SlotAllocator for the duration of the pull and unpinned
when it ends, whatever the outcome. Each pull has the deadline its request names; past it the
server sends ErrorReply("timeout") and drops the connection.
Threads: one accept thread plus one thread per open connection (at most ``max_connections``);
``close()`` shuts every socket and joins every thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import zlib

from kvbridge.errors import (
    AuthError,
    KVBridgeError,
    ProtocolError,
    RemoteError,
    TransferTimeout,
    describe_pending,
)
from kvbridge.pool import HostBlockPool, SlotAllocator
from kvbridge.protocol import (
    ErrorReply,
    HelloAck,
    check_bind,
    check_hello,
    encode_frame,
    recv_message,
)
from kvbridge.transport.base import (
    LayerBuffers,
    PoolRegion,
    SendHandle,
    TransferSpec,
    piece_views,
    remaining,
)
from kvbridge.transport.messages import ChunkHeader, PullDone, PullRequest

log = logging.getLogger(__name__)
AUTH_TIMEOUT_S = 5.0


class PublishedTransfer(SendHandle):
    """A send handle of the tcp transport: layers wait here until a receiver pulls them."""

    def __init__(self, server: BlockServer, spec: TransferSpec, source: LayerBuffers,
                 pins: SlotAllocator | None) -> None:
        self.spec = spec
        self._source: LayerBuffers | None = source
        self._server = server
        self._cond = threading.Condition()
        self._published = 0
        self._sent = 0
        self._done = False
        self._claimed = False
        self._closed = False
        self._error: KVBridgeError | None = None
        self._pins = pins
        if pins is not None:
            pins.pin(spec.source_slots)

    def publish_layer(self, layer: int) -> None:
        with self._cond:
            if layer != self._published or layer >= self.spec.num_layers:
                raise ValueError(f"layer: expected to publish layer {self._published} next, got {layer}")
            self._published += 1
            self._cond.notify_all()

    def poll(self) -> int:
        return self._sent

    def wait(self, deadline: float) -> None:
        start = time.monotonic()
        with self._cond:
            self._cond.wait_for(lambda: self._done or self._error is not None, remaining(deadline))
            if self._error is not None:
                raise self._error
            if not self._done:
                pending = describe_pending(list(range(self._sent, self.spec.num_layers)))
                raise TransferTimeout(f"tcp send {self.spec.transfer_id}", deadline - start, pending)

    @property
    def source(self) -> LayerBuffers:
        if self._source is None:
            raise RemoteError("aborted", f"transfer {self.spec.transfer_id} was closed by its producer")
        return self._source

    def close(self) -> None:
        self._server.unregister(self.spec.transfer_id, self)
        with self._cond:
            self._closed = True
            self._source = None  # the connection thread holds its own reference while streaming
            self._cond.notify_all()
        if self._pins is not None:
            pins, self._pins = self._pins, None
            pins.unpin(self.spec.source_slots)

    # ----- called by the server's connection thread

    def claim(self) -> None:
        with self._cond:
            if self._claimed or self._closed:
                raise ValueError(f"transfer_id: {self.spec.transfer_id!r} is already being pulled or closed")
            self._claimed = True

    def wait_published(self, layer: int, deadline: float, start: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._published > layer or self._closed, remaining(deadline))
            if self._closed:
                raise RemoteError("aborted", f"transfer {self.spec.transfer_id} was closed by its producer")
            if self._published <= layer:
                pending = describe_pending(list(range(self._published, self.spec.num_layers)))
                raise TransferTimeout(f"tcp serve {self.spec.transfer_id}", deadline - start, f"producer publishing {pending}")

    def layer_sent(self, layer: int) -> None:
        self._sent = layer + 1

    def finish(self, error: KVBridgeError | None) -> None:
        with self._cond:
            self._done = error is None
            # no traceback: its frames would keep the connection's buffer views alive
            self._error = None if error is None else error.with_traceback(None)
            self._cond.notify_all()


class BlockServer:
    def __init__(self, host: str, port: int, *, token: str | None, chunk_bytes: int,
                 sock_buf_bytes: int, max_connections: int = 64) -> None:
        check_bind(host, token)
        self._token = token
        self._chunk_bytes = chunk_bytes
        self._sock_buf_bytes = sock_buf_bytes
        self._max_connections = max_connections
        self._lock = threading.Condition()
        self._transfers: dict[str, PublishedTransfer] = {}
        self._pool: tuple[HostBlockPool, SlotAllocator] | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._listener = socket.create_server((host, port), backlog=max_connections)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._closed = False
        self._accept_thread = threading.Thread(target=self._accept_loop, name="kvbridge-block-server", daemon=True)
        self._accept_thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def register(self, transfer: PublishedTransfer) -> None:
        with self._lock:
            if transfer.spec.transfer_id in self._transfers:
                raise ValueError(f"transfer_id: {transfer.spec.transfer_id!r} is already registered")
            self._transfers[transfer.spec.transfer_id] = transfer
            self._lock.notify_all()

    def unregister(self, transfer_id: str, transfer: PublishedTransfer) -> None:
        with self._lock:
            if self._transfers.get(transfer_id) is transfer:
                del self._transfers[transfer_id]

    def serve_pool(self, pool: HostBlockPool, allocator: SlotAllocator) -> None:
        """Lets receivers pull (pinned) slots of ``pool`` by slot number."""
        self._pool = (pool, allocator)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        with self._lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for _, thread in conns:
            thread.join(5.0)
        self._accept_thread.join(5.0)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if len(self._conns) >= self._max_connections:
                    sock.close()
                    continue
                thread = threading.Thread(target=self._serve_conn, args=(sock,), name="kvbridge-block-conn", daemon=True)
                self._conns[sock] = thread
            thread.start()

    def _serve_conn(self, sock: socket.socket) -> None:
        transfer: PublishedTransfer | None = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sock_buf_bytes)
            sock.settimeout(AUTH_TIMEOUT_S)
            check_hello(recv_message(sock), self._token)
            sock.sendall(encode_frame(HelloAck("kvbridge-block-server")))
            request = recv_message(sock)
            if not isinstance(request, PullRequest):
                raise ProtocolError(f"expected PullRequest, got {type(request).__name__}")
            start = time.monotonic()
            deadline = start + request.timeout_s
            with self._source_for(request, deadline, start) as (source, transfer):
                self._stream(sock, request, source, transfer, deadline, start)
                sock.settimeout(remaining(deadline))
                done = recv_message(sock)
                if done != PullDone(request.num_layers):
                    raise ProtocolError(f"expected PullDone({request.num_layers}), got {done!r:.80}")
            if transfer is not None:
                transfer.finish(None)
        except (KVBridgeError, ValueError, OSError) as exc:
            self._fail(sock, transfer, exc)
        finally:
            with self._lock:
                self._conns.pop(sock, None)
            sock.close()

    def _fail(self, sock: socket.socket, transfer: PublishedTransfer | None, exc: Exception) -> None:
        code = {AuthError: "auth", ProtocolError: "protocol", TransferTimeout: "timeout",
                RemoteError: "aborted"}.get(type(exc), "invalid" if isinstance(exc, ValueError) else "io")
        log.info("kvbridge block server: pull failed (%s): %s", code, exc)
        if transfer is not None:
            err = exc if isinstance(exc, KVBridgeError) else RemoteError(code, str(exc))
            transfer.finish(err)
        if code != "io":
            try:
                sock.settimeout(1.0)
                sock.sendall(encode_frame(ErrorReply(code, str(exc))))
            except OSError:
                pass

    def _source_for(self, request: PullRequest, deadline: float, start: float) -> _Source:
        if request.transfer_id:
            with self._lock:
                self._lock.wait_for(lambda: request.transfer_id in self._transfers or self._closed,
                                    remaining(deadline))
                transfer = self._transfers.get(request.transfer_id)
            if transfer is None:
                raise TransferTimeout(f"tcp serve {request.transfer_id}", deadline - start, "producer start_send")
            transfer.claim()
            return _Source(transfer.source, transfer, None, ())
        if self._pool is None:
            raise ValueError("slots: this block server serves no pool")
        pool, allocator = self._pool
        allocator.pin(request.slots)
        return _Source(PoolRegion(pool.array, request.slots), None, allocator, request.slots)

    def _stream(self, sock: socket.socket, request: PullRequest, source: LayerBuffers,
                transfer: PublishedTransfer | None, deadline: float, start: float) -> None:
        if (source.num_layers, source.layer_nbytes) != (request.num_layers, request.layer_nbytes):
            raise ValueError(
                f"request: asks {request.num_layers} layers x {request.layer_nbytes} bytes, "
                f"source has {source.num_layers} x {source.layer_nbytes}"
            )
        for layer in range(request.num_layers):
            if transfer is not None:
                transfer.wait_published(layer, deadline, start)
            sock.settimeout(max(remaining(deadline), 1e-3))
            runs = source.layer_runs(layer)
            for offset in range(0, request.layer_nbytes, self._chunk_bytes):
                nbytes = min(self._chunk_bytes, request.layer_nbytes - offset)
                views = piece_views(runs, offset, nbytes)
                crc = 0
                if request.checksum:
                    for view in views:
                        crc = zlib.crc32(view, crc)
                sock.sendall(encode_frame(ChunkHeader(layer, offset, nbytes, crc)))
                for view in views:
                    sock.sendall(view)
            if transfer is not None:
                transfer.layer_sent(layer)


class _Source:
    """Context manager that unpins a pool pull's slots when the pull ends."""

    def __init__(self, buffers: LayerBuffers, transfer: PublishedTransfer | None,
                 allocator: SlotAllocator | None, slots: tuple[int, ...]) -> None:
        self._value = (buffers, transfer)
        self._allocator = allocator
        self._slots = slots

    def __enter__(self) -> tuple[LayerBuffers, PublishedTransfer | None]:
        return self._value

    def __exit__(self, *exc: object) -> None:
        if self._allocator is not None:
            self._allocator.unpin(self._slots)
