"""Cross-host transport over TCP: pipelined per layer, crc32 per chunk (on by default).

The producer's side is the node's :class:`BlockServer` (started on first use); the receiver
connects to the spec's endpoint and pulls. The receive handle reads in the caller's thread
inside ``wait_layer``/``wait``, straight into the destination runs with ``recv_into`` (no
staging copy); the kernel's socket buffers keep the producer streaming meanwhile. A failed
or timed-out receive handle is finished: close it (the producer sees the connection drop).
"""

from __future__ import annotations

import socket
import time
import zlib
from typing import TypeVar

from kvbridge.errors import (
    KVBridgeError,
    ProtocolError,
    RemoteError,
    TransferTimeout,
    describe_pending,
)
from kvbridge.handle import KVHandle
from kvbridge.pool import HostBlockPool, SlotAllocator
from kvbridge.protocol import (
    ErrorReply,
    Hello,
    HelloAck,
    encode_frame,
    expect_message,
    recv_message,
)
from kvbridge.transport.base import (
    LayerBuffers,
    RecvHandle,
    SendHandle,
    TransferSpec,
    Transport,
    piece_views,
    remaining,
)
from kvbridge.transport.messages import ChunkHeader, PullDone, PullRequest
from kvbridge.transport.tcp_server import BlockServer, PublishedTransfer

M = TypeVar("M")
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_SOCK_BUF_BYTES = 4 * 1024 * 1024


def pull_spec(handle: KVHandle) -> TransferSpec:
    """The spec that pulls a finished prefill's blocks (by slot) from the handle's block server."""
    layout = handle.layout
    return TransferSpec("", layout.num_layers, len(handle.block_slots) * layout.block_bytes,
                        endpoint=handle.source_endpoint, source_slots=handle.block_slots)


class TcpRecvHandle(RecvHandle):
    def __init__(self, transport: TcpTransport, spec: TransferSpec, dest: LayerBuffers) -> None:
        self.spec = spec
        self.num_layers = spec.num_layers
        self._dest: LayerBuffers | None = dest
        self._checksum = transport.checksum
        self._received = 0
        self._layer_offset = 0
        self._failed: KVBridgeError | None = None
        host, _, port = spec.endpoint.rpartition(":")
        self._sock: socket.socket | None = socket.create_connection((host, int(port)), timeout=transport.connect_timeout_s)
        try:
            self._handshake(transport, spec)
        except BaseException:
            self.close()
            raise

    def _handshake(self, transport: TcpTransport, spec: TransferSpec) -> None:
        sock = self._live()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, transport.sock_buf_bytes)
        sock.sendall(encode_frame(Hello(transport.token or "", "tcp-recv")))
        self._expect(recv_message(sock), HelloAck)
        sock.sendall(encode_frame(PullRequest(spec.transfer_id, spec.source_slots, spec.num_layers,
                                              spec.layer_nbytes, transport.timeout_s, self._checksum)))

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise RuntimeError(f"tcp transfer {self.spec.transfer_id or self.spec.source_slots[:4]} is closed")
        return self._sock

    @staticmethod
    def _expect(msg: object, cls: type[M]) -> M:
        if isinstance(msg, ErrorReply):
            raise RemoteError(msg.code, msg.message)
        return expect_message(msg, cls)

    def poll(self) -> int:
        return self._received

    def wait_layer(self, layer: int, deadline: float) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: {layer} out of range [0, {self.num_layers})")
        if self._failed is not None:
            raise self._failed
        start = time.monotonic()
        try:
            while self._received <= layer:
                self._recv_chunk(deadline)
        except TimeoutError:
            name = self.spec.transfer_id or "slot pull"
            pending = describe_pending(list(range(self._received, layer + 1)))
            self._failed = TransferTimeout(f"tcp recv {name} from {self.spec.endpoint}", deadline - start, pending)
        except (KVBridgeError, OSError) as exc:
            self._failed = exc if isinstance(exc, KVBridgeError) else RemoteError("io", str(exc))
        if self._failed is not None:
            self.close()
            raise self._failed

    def _recv_chunk(self, deadline: float) -> None:
        sock = self._live()
        left = remaining(deadline)
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        header = self._expect(recv_message(sock), ChunkHeader)
        if (header.layer, header.offset) != (self._received, self._layer_offset) or \
                header.nbytes < 1 or header.offset + header.nbytes > self.spec.layer_nbytes:
            raise ProtocolError(
                f"chunk (layer {header.layer}, offset {header.offset}, {header.nbytes} bytes) out of order; "
                f"expected layer {self._received} offset {self._layer_offset}"
            )
        if self._dest is None:
            raise RuntimeError("tcp transfer is closed")
        crc = 0
        for view in piece_views(self._dest.layer_runs(header.layer), header.offset, header.nbytes):
            _recv_into(sock, view)
            if self._checksum:
                crc = zlib.crc32(view, crc)
        if self._checksum and crc != header.crc32:
            raise ProtocolError(f"checksum mismatch in layer {header.layer} at offset {header.offset}: "
                                f"crc32 {crc:#010x}, sender said {header.crc32:#010x}")
        self._layer_offset += header.nbytes
        if self._layer_offset == self.spec.layer_nbytes:
            self._received += 1
            self._layer_offset = 0
            if self._received == self.num_layers:
                sock.sendall(encode_frame(PullDone(self.num_layers)))

    def close(self) -> None:
        self._dest = None  # drop our views of the destination
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got, total = 0, len(view)
    while got < total:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ProtocolError(f"connection closed after {got} of {total} chunk bytes")
        got += n


class TcpTransport(Transport):
    """One per node: its block server (producer side, started lazily) and its pulls."""

    name = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 checksum: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 sock_buf_bytes: int = DEFAULT_SOCK_BUF_BYTES, timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes: expected >= 1, got {chunk_bytes}")
        self.host, self.port, self.token = host, port, token
        self.checksum = checksum
        self.chunk_bytes = chunk_bytes
        self.sock_buf_bytes = sock_buf_bytes
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._server: BlockServer | None = None

    @property
    def server(self) -> BlockServer:
        if self._server is None:
            self._server = BlockServer(self.host, self.port, token=self.token, chunk_bytes=self.chunk_bytes,
                                       sock_buf_bytes=self.sock_buf_bytes)
        return self._server

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def spec_for(self, transfer_id: str, num_layers: int, layer_nbytes: int,
                 source_slots: tuple[int, ...] = ()) -> TransferSpec:
        """A published transfer's spec; ``source_slots`` are what ``start_send(pins=...)`` pins."""
        if not transfer_id:
            raise ValueError("transfer_id: must be non-empty for a published transfer")
        return TransferSpec(transfer_id, num_layers, layer_nbytes, endpoint=self.endpoint, source_slots=source_slots)

    def serve_pool(self, pool: HostBlockPool, allocator: SlotAllocator) -> None:
        self.server.serve_pool(pool, allocator)

    def start_send(self, spec: TransferSpec, source: LayerBuffers, pins: SlotAllocator | None = None) -> SendHandle:
        if not spec.transfer_id:
            raise ValueError("spec.transfer_id: must be non-empty for a published transfer")
        spec.check_buffers(source, "source")
        transfer = PublishedTransfer(self.server, spec, source, pins)
        try:
            self.server.register(transfer)
        except ValueError:
            transfer.close()
            raise
        return transfer

    def start_recv(self, spec: TransferSpec, dest: LayerBuffers) -> RecvHandle:
        if not spec.endpoint:
            raise ValueError("spec.endpoint: tcp needs the producer's block server 'host:port'")
        spec.check_buffers(dest, "dest")
        return TcpRecvHandle(self, spec, dest)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
