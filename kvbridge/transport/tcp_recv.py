"""The receiving side of the tcp transport: one selector thread per transport drives every pull.

:class:`Receiver` (owned by a TcpTransport, ``close()``-d by it) runs one thread with a
selector over the sockets of all open :class:`TcpRecvHandle`s; each readable socket advances
its pull by at most one chunk (non-blocking ``recv_into`` straight into the destination runs,
then the chunk's xxh3_64 is checked; a chunk may span layers the producer had published), so ``poll()`` reports layers as they land and a waiter
on layer i wakes as soon as layer i is complete. A finished pull's connection goes back to
the transport's :class:`ConnectionPool`; a failed or closed one is closed. A pull by slot
carries the slots' generations (``spec.source_gens``); when they are stale the server answers
ErrorReply("stale") and the pull fails with RemoteError("stale", ...).

Ownership: from ``start_recv`` to ``close()`` the receiver thread may write the destination;
``close()`` waits for a chunk step in progress, and no byte is written after it returns.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections import deque

from kvbridge.errors import (
    ChecksumMismatch,
    KVBridgeError,
    ProtocolError,
    RemoteError,
    TransferTimeout,
    describe_pending,
)
from kvbridge.protocol import encode_frame
from kvbridge.transport.base import LayerBuffers, RecvHandle, TransferSpec, remaining
from kvbridge.transport.messages import ChunkHeader, PullDone, PullRequest
from kvbridge.transport.regions import span_views
from kvbridge.transport.tcp_conn import ConnectionPool, FrameReader, checksum, expect_reply

log = logging.getLogger(__name__)
MAX_CONTROL_FRAME_BYTES = 64 * 1024


class TcpRecvHandle(RecvHandle):
    """One pull over a pooled connection; progress is made by the transport's Receiver thread."""

    def __init__(self, spec: TransferSpec, dest: LayerBuffers, *, checksum_on: bool, timeout_s: float,
                 pool: ConnectionPool, receiver: Receiver) -> None:
        self.spec = spec
        self.num_layers = spec.num_layers
        self.endpoint = spec.endpoint
        self._dest: LayerBuffers | None = dest
        self._checksum_on = checksum_on
        self._receiver = receiver
        self._cond = threading.Condition()
        self._received = 0  # layers complete in the destination (verified)
        self._pos = 0  # payload bytes received and verified (layers back to back)
        self._total = spec.num_layers * spec.layer_nbytes
        self._wake_at = spec.num_layers  # lowest layer a waiter blocks on (num_layers: none)
        self._chunk: ChunkHeader | None = None
        self._views: list[memoryview] = []
        self._view_i = self._view_off = 0
        self._frames = FrameReader(MAX_CONTROL_FRAME_BYTES)
        self._failed: KVBridgeError | None = None
        self._closed = False
        self._detached = False  # set once the receiver has let go of the socket
        self.sock = pool.acquire(spec.endpoint)
        try:
            self.sock.settimeout(timeout_s)
            self.sock.sendall(encode_frame(PullRequest(spec.transfer_id, spec.source_slots, spec.pool_name, spec.num_layers,
                                                       spec.layer_nbytes, timeout_s, checksum_on, spec.source_gens,
                                                       spec.num_held)))
            self.sock.setblocking(False)
            receiver.add(self)
        except BaseException:
            self.sock.close()
            raise

    @property
    def _name(self) -> str:
        return self.spec.transfer_id or "slot pull"

    # ----- caller side

    def poll(self) -> int:
        return self._received

    def wait_layer(self, layer: int, deadline: float) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: {layer} out of range [0, {self.num_layers})")
        start = time.monotonic()
        with self._cond:
            while self._received <= layer and self._failed is None and not self._closed:
                self._wake_at = min(self._wake_at, layer)  # the receiver notifies only once it is in
                if not self._cond.wait(remaining(deadline)):
                    break
            if self._received > layer:
                return
            if self._failed is None:
                if self._closed:
                    raise RuntimeError(f"tcp transfer {self._name} is closed")
                pending = describe_pending(list(range(self._received, layer + 1)))
                self._failed = TransferTimeout(f"tcp recv {self._name} from {self.endpoint}", max(0.0, deadline - start), pending)
            failed = self._failed
        self.close()
        raise failed

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._dest = None  # drop our views of the destination
            self._views = []
            detached = self._detached
        if not detached:  # a finished pull is no longer the receiver's: no wake-up needed
            self._receiver.drop(self)

    # ----- receiver thread side

    def on_readable(self) -> bool:
        """Advances by at most one chunk; True once this pull needs no more reads."""
        with self._cond:
            if self._closed or self._failed is not None:
                return True
            try:
                self._read_chunk()
            except BlockingIOError:
                return False
            except Exception as exc:  # noqa: BLE001 - one broken pull must not stop the others
                self.fail(exc)
                return True
            # once all is in, Receiver._finish() pools the socket, then completes the pull
            return self._pos == self._total

    def _read_chunk(self) -> None:
        if self._chunk is None:
            self._start_chunk(expect_reply(self._frames.read(self.sock), ChunkHeader))
        views = self._views
        while self._view_i < len(views):
            view = views[self._view_i]
            n = self.sock.recv_into(view[self._view_off:])
            if n == 0:
                raise ProtocolError(f"connection closed mid-chunk at byte {self._pos} of the payload")
            self._view_off += n
            if self._view_off == view.nbytes:
                self._view_i, self._view_off = self._view_i + 1, 0
        self._end_chunk()

    def _start_chunk(self, header: ChunkHeader) -> None:
        layer, offset = divmod(self._pos, self.spec.layer_nbytes)
        if (header.layer, header.offset) != (layer, offset) or not 0 < header.nbytes <= self._total - self._pos:
            raise ProtocolError(
                f"chunk (layer {header.layer}, offset {header.offset}, {header.nbytes} bytes) out of order; "
                f"expected layer {layer} offset {offset}, at most {self._total - self._pos} bytes"
            )
        if self._dest is None:
            raise RuntimeError(f"tcp transfer {self._name} is closed")
        self._chunk = header
        self._views = span_views(self._dest, self._pos, header.nbytes)
        self._view_i = self._view_off = 0

    def _end_chunk(self) -> None:
        header, self._chunk = self._chunk, None
        if header is None:
            raise RuntimeError("chunk ended without a header")
        if self._checksum_on:
            got = checksum(self._views)
            if got != header.checksum:
                raise ChecksumMismatch(
                    f"checksum mismatch in layer {header.layer} at offset {header.offset} ({header.nbytes} bytes) "
                    f"from {self.endpoint}: xxh3_64 {got:#018x}, sender said {header.checksum:#018x}"
                )
        self._views = []
        self._pos += header.nbytes
        # the last layer counts only in complete(), once the connection is back in the pool
        received = min(self._pos // self.spec.layer_nbytes, self.num_layers - 1)
        if received > self._received:
            self._received = received
            if received > self._wake_at:
                self._wake_at = self.num_layers
                self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        """Records why the pull ended (no traceback: its frames would pin destination views)."""
        with self._cond:
            if self._failed is None and self._received < self.num_layers:
                err = exc if isinstance(exc, KVBridgeError) else RemoteError("io", str(exc))
                if not isinstance(exc, (KVBridgeError, OSError)):
                    log.error("kvbridge tcp receive: broken pull %s: %r", self._name, exc)
                self._failed = err.with_traceback(None)
            self._cond.notify_all()

    def detach(self) -> None:
        with self._cond:
            self._detached = True

    def last_layer_in(self) -> bool:
        with self._cond:
            return self._failed is None and not self._closed and self._pos == self._total

    def complete(self) -> None:
        """Marks the last layer received (its connection already went back to the pool)."""
        with self._cond:
            if self._pos == self._total:
                self._received = self.num_layers
                self._cond.notify_all()


class Receiver:
    """The selector thread of one TcpTransport; see the module docstring."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._ops: deque[tuple[bool, TcpRecvHandle]] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvbridge-tcp-recv", daemon=True)
        self._thread.start()

    def add(self, pull: TcpRecvHandle) -> None:
        self._enqueue(True, pull)

    def drop(self, pull: TcpRecvHandle) -> None:
        self._enqueue(False, pull)

    def _enqueue(self, add: bool, pull: TcpRecvHandle) -> None:
        with self._lock:
            if self._closed:
                if add:
                    raise RuntimeError("tcp transport is closed")
                return
            self._ops.append((add, pull))
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        registered: set[TcpRecvHandle] = set()
        try:
            while self._apply_ops(registered):
                for key, _ in self._sel.select():
                    pull = key.data
                    if pull is None:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                    elif pull in registered and pull.on_readable():
                        self._finish(pull, registered)
        finally:
            for pull in list(registered):
                pull.fail(RemoteError("closed", f"tcp transport closed during {pull.spec.transfer_id or 'slot pull'}"))
                self._finish(pull, registered)

    def _apply_ops(self, registered: set[TcpRecvHandle]) -> bool:
        with self._lock:
            ops, self._ops = list(self._ops), deque()
            closed = self._closed
        for add, pull in ops:
            if add:
                self._sel.register(pull.sock, selectors.EVENT_READ, pull)
                registered.add(pull)
            elif pull in registered:
                self._finish(pull, registered)
        return not closed

    def _finish(self, pull: TcpRecvHandle, registered: set[TcpRecvHandle]) -> None:
        """Unregisters ``pull``; a complete one pools its socket (after PullDone for a published
        transfer), others close it."""
        registered.discard(pull)
        self._sel.unregister(pull.sock)
        pull.detach()
        sock = pull.sock
        if not pull.last_layer_in():
            sock.close()
            return
        try:
            if pull.spec.transfer_id:
                sock.settimeout(1.0)
                sock.sendall(encode_frame(PullDone(pull.num_layers)))
            self._pool.release(pull.endpoint, sock)  # back in the pool before the waiter wakes
        except OSError:
            sock.close()
        pull.complete()

    def close(self) -> None:
        """Stops the thread; open pulls fail with RemoteError('closed'). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")
        self._thread.join(10.0)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
