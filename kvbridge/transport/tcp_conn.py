"""Sockets of the block-server protocol: options, pooled client connections, vectored sends.

:class:`ConnectionPool` keeps up to ``max_idle_per_peer`` authenticated connections per
endpoint, so a pull pays neither the TCP handshake nor the Hello round trip once warm. A
connection goes back to the pool only after a request finished cleanly (the stream is at a
frame boundary); any failure closes it. Idle connections the peer has closed are dropped on
checkout. The pool owns its idle sockets; a checked-out socket belongs to the caller.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Sequence
from typing import TypeVar

import xxhash

from kvbridge.auth import Hello, HelloAck
from kvbridge.errors import ProtocolError, RemoteError
from kvbridge.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER,
    ErrorReply,
    decode_body,
    decode_header,
    encode_frame,
    expect_message,
    recv_exactly,
    recv_message,
)

M = TypeVar("M")
_MAX_IOV = 512  # well under IOV_MAX (1024)


def checksum(views: Sequence[memoryview]) -> int:
    """xxh3_64 of the concatenation of ``views`` (~10 GB/s; crc32 manages ~1-3 GB/s)."""
    if len(views) == 1:
        return int(xxhash.xxh3_64_intdigest(views[0]))
    hasher = xxhash.xxh3_64()
    for view in views:
        hasher.update(view)
    return int(hasher.intdigest())


def tune(sock: socket.socket, sock_buf_bytes: int) -> None:
    """TCP_NODELAY and large kernel buffers (set before connect so the window can scale)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sock_buf_bytes > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sock_buf_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sock_buf_bytes)


def send_buffers(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    """Sends every buffer, in order, with as few ``sendmsg`` calls as the kernel allows."""
    views = [memoryview(b) for b in buffers]
    while views:
        sent = sock.sendmsg(views[:_MAX_IOV])
        while sent:
            head = views[0].nbytes
            if sent >= head:
                sent -= head
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def recv_request(sock: socket.socket, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 frame_timeout_s: float | None = None) -> object | None:
    """The next frame of a persistent connection; None when the peer closed it between frames.
    Waiting for a frame to start is bounded by the socket's timeout; once its first byte came,
    the whole frame must arrive within ``frame_timeout_s``."""
    header = bytearray(HEADER.size)
    got = sock.recv_into(header)
    if got == 0:
        return None
    deadline = None if frame_timeout_s is None else time.monotonic() + frame_timeout_s
    if got < HEADER.size:
        header[got:] = recv_exactly(sock, HEADER.size - got, deadline)
    length = decode_header(bytes(header), max_frame_bytes)
    return decode_body(bytes(recv_exactly(sock, length, deadline)))


class FrameReader:
    """Reads one frame from a non-blocking socket across calls (BlockingIOError = not yet)."""

    def __init__(self, max_frame_bytes: int) -> None:
        self._max_frame_bytes = max_frame_bytes
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray(HEADER.size)
        self._got = 0
        self._in_body = False

    def read(self, sock: socket.socket) -> object:
        while True:
            view = memoryview(self._buf)
            while self._got < len(self._buf):
                n = sock.recv_into(view[self._got:])
                if n == 0:
                    raise ProtocolError(f"connection closed mid-frame after {self._got} bytes")
                self._got += n
            if self._in_body:
                body = bytes(self._buf)
                self._reset()
                return decode_body(body)
            length = decode_header(bytes(self._buf), self._max_frame_bytes)
            self._buf, self._got, self._in_body = bytearray(length), 0, True


def expect_reply(msg: object, cls: type[M]) -> M:
    """``msg`` if it is a ``cls``; RemoteError for an ErrorReply; ProtocolError otherwise."""
    if isinstance(msg, ErrorReply):
        raise RemoteError(msg.code, msg.message)
    return expect_message(msg, cls)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint: expected 'host:port', got {endpoint!r}")
    return host, int(port)


def _peek(sock: socket.socket) -> bytes | None:
    """One byte peeked without waiting: b"" at EOF or on a socket error, None when nothing is
    readable yet. The socket's timeout is kept."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # with a timeout set, Python would wait for data before peeking
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
    finally:
        sock.settimeout(timeout)


def _is_stale(sock: socket.socket) -> bool:
    """An idle connection must have nothing to read: EOF or stray bytes make it unusable."""
    return _peek(sock) is not None


def peer_closed(sock: socket.socket) -> bool:
    """The peer closed its end (an orderly EOF is readable without consuming anything)."""
    return _peek(sock) == b""


class ConnectionPool:
    """Authenticated client connections to block servers, reused across requests."""

    def __init__(self, *, token: str | None, peer: str, connect_timeout_s: float, sock_buf_bytes: int,
                 max_idle_per_peer: int = 4) -> None:
        self._token = token or ""
        self._peer = peer
        self._connect_timeout_s = connect_timeout_s
        self._sock_buf_bytes = sock_buf_bytes
        self._max_idle = max_idle_per_peer
        self._idle: dict[str, list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self, endpoint: str) -> socket.socket:
        """A blocking connection to ``endpoint``, authenticated, with no request in flight."""
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("connection pool is closed")
                idle = self._idle.get(endpoint)
                sock = idle.pop() if idle else None
            if sock is None:
                return self._connect(endpoint)
            if not _is_stale(sock):
                return sock
            sock.close()

    def num_idle(self, endpoint: str) -> int:
        with self._lock:
            return len(self._idle.get(endpoint, ()))

    def release(self, endpoint: str, sock: socket.socket) -> None:
        """Returns a connection at a frame boundary; it is closed if the pool is full or closed."""
        with self._lock:
            idle = self._idle.setdefault(endpoint, [])
            if not self._closed and len(idle) < self._max_idle:
                sock.settimeout(None)
                idle.append(sock)
                return
        sock.close()

    def _connect(self, endpoint: str) -> socket.socket:
        host, port = split_endpoint(endpoint)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            tune(sock, self._sock_buf_bytes)
            sock.settimeout(self._connect_timeout_s)
            sock.connect((host, port))
            sock.sendall(encode_frame(Hello(self._token, self._peer)))
            expect_reply(recv_message(sock), HelloAck)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.close()

