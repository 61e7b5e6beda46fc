"""The block server: the producer side of the tcp transport, and the pin service of shm pulls.

One per node. Connections are persistent (clients pool them): after Hello, a connection
serves requests one after another (see kvbridge.transport.messages):

- a pull of a *published transfer* (registered by ``start_send``; layers go out as the
  producer publishes them) or of *pool slots* (already-written blocks of the pool given to
  ``serve_pool``, e.g. a decode pulling a finished prefill's KV by handle). Slots of a pool
  pull are pinned in the pool's SlotAllocator for the pull and unpinned when it ends,
  whatever the outcome: after the last chunk went to the kernel (a pool pull has no
  PullDone), or on failure. Chunks go out with one ``sendmsg`` of header + views, each with its
  xxh3_64 when asked.
- a *pin* (shm pull by handle): pinned until the client's Unpin, the pin's deadline, or the
  connection's end, whichever comes first; an abandoned pin expires, it never leaks.

Pool pulls and pins carrying slot generations (a KV handle's ``block_gens``) pin only if every
slot still has its generation (``SlotAllocator.pin(slots, gens)``, atomic): a slot freed and
handed to another sequence since the handle was built is refused with ErrorReply("stale"),
nothing is pinned, and the connection is closed, as after any failed request.

Each request has the deadline it names, capped at ``max_wait_s``; past it the server sends
ErrorReply("timeout") and drops the connection (any failure drops it). A peer that disconnects
while its pull waits for a transfer frees its thread within ``PEER_POLL_S``. Threads: one accept
thread plus one persistent thread per open connection (at most ``max_connections``; when full, a
new connection takes the place of the longest-idle one, else it is refused), never one per
request; ``close()`` shuts every socket and joins every thread.

Memory before and after authentication: the Hello frame may announce at most
``HELLO_MAX_FRAME_BYTES`` and must arrive whole within ``auth_timeout_s``; a request frame at
most ``REQUEST_MAX_FRAME_BYTES``, whole within ``frame_timeout_s`` of its first byte. So one
connection buffers at most 1 MiB and the server at most ``max_connections`` MiB, however
slowly a peer trickles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

from kvbridge.auth import HelloAck, check_bind, check_hello
from kvbridge.errors import (
    AuthError,
    KVBridgeError,
    ProtocolError,
    RemoteError,
    StaleSlots,
    TransferTimeout,
)
from kvbridge.pool import HostBlockPool
from kvbridge.protocol import ErrorReply, encode_frame, recv_message
from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import LayerBuffers, remaining
from kvbridge.transport.messages import (
    ChunkHeader,
    PinGranted,
    PinRequest,
    PullDone,
    PullRequest,
    ResolveReply,
    ResolveRequest,
    Unpin,
)
from kvbridge.transport.regions import PoolRegion, span_views
from kvbridge.transport.tcp_conn import checksum, peer_closed, recv_request, send_buffers, tune
from kvbridge.transport.tcp_publish import PublishedTransfer

log = logging.getLogger(__name__)
Resolver = Callable[[Sequence[bytes]], Sequence[int]]
AUTH_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 300.0
FRAME_TIMEOUT_S = 10.0
MAX_WAIT_S = 60.0
PEER_POLL_S = 0.25
HELLO_MAX_FRAME_BYTES = 4096
REQUEST_MAX_FRAME_BYTES = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class _Source:
    """What a pull streams from; ``release()`` unpins a pool pull's slots."""

    buffers: LayerBuffers
    transfer: PublishedTransfer | None
    allocator: SlotAllocator | None = None
    slots: tuple[int, ...] = ()

    def release(self) -> None:
        if self.allocator is not None:
            self.allocator.unpin(self.slots)


class BlockServer:
    def __init__(self, host: str, port: int, *, token: str | None, chunk_bytes: int,
                 sock_buf_bytes: int, max_connections: int = 64, auth_timeout_s: float = AUTH_TIMEOUT_S,
                 frame_timeout_s: float = FRAME_TIMEOUT_S, max_wait_s: float = MAX_WAIT_S) -> None:
        check_bind(host, token)
        self._token = token
        self._auth_timeout_s, self._frame_timeout_s = auth_timeout_s, frame_timeout_s
        self._max_wait_s = max_wait_s
        self._idle_since: dict[socket.socket, float] = {}  # connections waiting for a request
        self._chunk_bytes = chunk_bytes
        self._sock_buf_bytes = sock_buf_bytes
        self._max_connections = max_connections
        self._lock = threading.Condition()
        self._transfers: dict[str, PublishedTransfer] = {}
        self._pool: tuple[HostBlockPool, SlotAllocator] | None = None
        self._resolver: Resolver | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._listener = socket.create_server((host, port), backlog=max_connections)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._closed = False
        self.connections_accepted = 0
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

    def serve_pool(self, pool: HostBlockPool, allocator: SlotAllocator,
                   resolver: Resolver | None = None) -> None:
        """Lets receivers pull (pinned) slots of ``pool`` by slot number; with ``resolver``
        (block hashes -> the slots of the longest prefix held, any thread), by chain too."""
        self._pool = (pool, allocator)
        self._resolver = resolver

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
                if len(self._conns) >= self._max_connections and not self._evict_idle():
                    log.warning("kvbridge block server: %d connections, none idle: refusing one",
                                len(self._conns))
                    sock.close()
                    continue
                self.connections_accepted += 1
                thread = threading.Thread(target=self._serve_conn, args=(sock,), name="kvbridge-block-conn", daemon=True)
                self._conns[sock] = thread
            thread.start()

    def _evict_idle(self) -> bool:
        """Shuts the longest-idle connection down (its thread then ends); False if none is idle.
        Caller holds the lock."""
        if not self._idle_since:
            return False
        oldest = min(self._idle_since, key=self._idle_since.__getitem__)
        del self._idle_since[oldest]
        with contextlib.suppress(OSError):
            oldest.shutdown(socket.SHUT_RDWR)
        return True

    def _serve_conn(self, sock: socket.socket) -> None:
        try:
            tune(sock, self._sock_buf_bytes)
            hello = recv_message(sock, HELLO_MAX_FRAME_BYTES, time.monotonic() + self._auth_timeout_s)
            check_hello(hello, self._token)
            sock.sendall(encode_frame(HelloAck("kvbridge-block-server")))
            while not self._closed:
                sock.settimeout(IDLE_TIMEOUT_S)
                with self._lock:
                    self._idle_since[sock] = time.monotonic()
                try:
                    request = recv_request(sock, REQUEST_MAX_FRAME_BYTES, self._frame_timeout_s)
                finally:
                    with self._lock:
                        self._idle_since.pop(sock, None)
                if isinstance(request, PullRequest):
                    self._serve_pull(sock, request)
                elif isinstance(request, PinRequest):
                    if not self._serve_pin(sock, request):
                        return
                elif isinstance(request, ResolveRequest):
                    sock.sendall(encode_frame(self._resolve(request)))
                elif request is None:
                    return
                else:
                    raise ProtocolError(f"expected PullRequest, PinRequest or ResolveRequest, "
                                        f"got {type(request).__name__}")
        except (KVBridgeError, ValueError, OSError) as exc:
            self._fail(sock, exc)
        finally:
            with self._lock:
                self._conns.pop(sock, None)
                self._idle_since.pop(sock, None)
            sock.close()

    def _fail(self, sock: socket.socket, exc: Exception) -> None:
        code = {AuthError: "auth", ProtocolError: "protocol", TransferTimeout: "timeout",
                RemoteError: "aborted", StaleSlots: "stale"}.get(type(exc), "invalid" if isinstance(exc, ValueError) else "io")
        log.info("kvbridge block server: request failed (%s): %s", code, exc)
        if code != "io":
            try:
                sock.settimeout(1.0)
                sock.sendall(encode_frame(ErrorReply(code, str(exc))))
            except OSError:
                pass

    def _serve_pull(self, sock: socket.socket, request: PullRequest) -> None:
        start = time.monotonic()
        deadline = start + min(request.timeout_s, self._max_wait_s)
        source = self._source_for(sock, request, deadline, start)
        try:
            self._stream(sock, request, source, deadline, start)
            if source.transfer is not None:  # the producer's wait() reports the consumer's receipt
                sock.settimeout(max(remaining(deadline), 1e-3))
                done = recv_message(sock)
                if done != PullDone(request.num_layers):
                    raise ProtocolError(f"expected PullDone({request.num_layers}), got {done!r:.80}")
        except (KVBridgeError, ValueError, OSError) as exc:
            if source.transfer is not None:
                code = "invalid" if isinstance(exc, ValueError) else "io"
                source.transfer.finish(exc if isinstance(exc, KVBridgeError) else RemoteError(code, str(exc)))
            raise
        finally:
            source.release()
        if source.transfer is not None:
            source.transfer.finish(None)

    def _serve_pin(self, sock: socket.socket, request: PinRequest) -> bool:
        """Pins, grants, holds the pin until Unpin or the deadline; False ends the connection.

        On any failure the consumer is told (ErrorReply) and the connection shut down *before*
        the slots are unpinned, so a consumer that still sees its connection open after a
        copy knows the pin held during it.
        """
        start = time.monotonic()
        pool, allocator = self._served_pool(request.pool_name)
        allocator.pin(request.slots, request.gens)
        try:
            sock.sendall(encode_frame(PinGranted(pool.handle)))
            timeout_s = min(request.timeout_s, self._max_wait_s)
            sock.settimeout(max(timeout_s - (time.monotonic() - start), 1e-3))
            try:
                reply = recv_request(sock)
            except TimeoutError:
                raise TransferTimeout(f"shm pin of {len(request.slots)} slots", timeout_s,
                                      "the consumer's unpin") from None
            if reply is None:
                return False
            if reply != Unpin(len(request.slots)):
                raise ProtocolError(f"expected Unpin({len(request.slots)}), got {reply!r:.80}")
            return True
        except (KVBridgeError, ValueError, OSError) as exc:
            self._fail(sock, exc)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            return False
        finally:
            allocator.unpin(request.slots)

    def _resolve(self, request: ResolveRequest) -> ResolveReply:
        if self._pool is None or self._resolver is None:
            raise ValueError("block_hashes: this block server resolves no chains")
        allocator = self._pool[1]
        slots = tuple(self._resolver(request.block_hashes))
        name = self._pool[0].handle.name if slots else ""
        return ResolveReply(name, slots, allocator.generations(slots))

    def _served_pool(self, pool_name: str) -> tuple[HostBlockPool, SlotAllocator]:
        if self._pool is None:
            raise ValueError("slots: this block server serves no pool")
        pool, allocator = self._pool
        if pool_name and pool_name != pool.handle.name:
            raise ValueError(f"pool_name: this block server serves pool {pool.handle.name!r}, not {pool_name!r}")
        return pool, allocator

    def _source_for(self, sock: socket.socket, request: PullRequest, deadline: float, start: float) -> _Source:
        if request.transfer_id:
            transfer = None
            while transfer is None and remaining(deadline) > 0 and not self._closed:
                with self._lock:
                    self._lock.wait_for(lambda: request.transfer_id in self._transfers or self._closed,
                                        min(PEER_POLL_S, remaining(deadline)))
                    transfer = self._transfers.get(request.transfer_id)
                if transfer is None and peer_closed(sock):
                    raise ProtocolError(f"peer left while its pull of {request.transfer_id} waited")
            if transfer is None:
                raise TransferTimeout(f"tcp serve {request.transfer_id}", deadline - start, "producer start_send")
            transfer.claim()
            return _Source(transfer.source, transfer)
        pool, allocator = self._served_pool(request.pool_name)
        allocator.pin(request.slots, request.gens)  # the held ones too: the unpin names the handle's slots
        return _Source(PoolRegion.of_pool(pool, request.slots[request.num_held:]), None, allocator, request.slots)

    def _stream(self, sock: socket.socket, request: PullRequest, source: _Source, deadline: float,
                start: float) -> None:
        buffers, transfer = source.buffers, source.transfer
        if (buffers.num_layers, buffers.layer_nbytes) != (request.num_layers, request.layer_nbytes):
            raise ValueError(
                f"request: asks {request.num_layers} layers x {request.layer_nbytes} bytes, "
                f"source has {buffers.num_layers} x {buffers.layer_nbytes}"
            )
        layer_nbytes, total = request.layer_nbytes, request.num_layers * request.layer_nbytes
        pos = 0
        sock.settimeout(max(remaining(deadline), 1e-3))
        while pos < total:
            end = total
            if transfer is not None:
                end = transfer.wait_published(pos // layer_nbytes, deadline, start) * layer_nbytes
                sock.settimeout(max(remaining(deadline), 1e-3))
            # one chunk may span several layers (all published): per-chunk cost stays small
            nbytes = min(self._chunk_bytes, end - pos)
            views = span_views(buffers, pos, nbytes)
            digest = checksum(views) if request.checksum else 0
            layer, offset = divmod(pos, layer_nbytes)
            send_buffers(sock, [encode_frame(ChunkHeader(layer, offset, nbytes, digest)), *views])
            pos += nbytes
            if transfer is not None:
                transfer.layers_sent(pos // layer_nbytes)
