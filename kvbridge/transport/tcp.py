"""Cross-host transport over TCP: pipelined per layer, xxh3_64 per chunk (on by default).

The producer's side is the node's :class:`BlockServer` (started on first use): it serves
published transfers and, once ``serve_pool`` was called, pulls of pool slots by KV handle.
The consumer's side pulls over pooled, authenticated connections (:class:`ConnectionPool`)
and receives in one background thread per transport (:class:`Receiver`), straight into the
destination runs with ``recv_into`` (no staging copy); ``poll()`` reports layers as they
land. Every chunk's checksum is verified on receipt: a mismatch fails the pull with
ChecksumMismatch. A failed or timed-out receive handle is finished (its connection closed).
``close()`` stops the receiver (failing open pulls), then the pooled connections, then the
server.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvbridge.handle import KVHandle
from kvbridge.pool import HostBlockPool
from kvbridge.protocol import encode_frame, recv_message
from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import (
    LayerBuffers,
    RecvHandle,
    SendHandle,
    TransferSpec,
    Transport,
    TransportOptions,
)
from kvbridge.transport.messages import PinGranted, PinRequest, ResolveReply, ResolveRequest, Unpin
from kvbridge.transport.tcp_conn import ConnectionPool, expect_reply
from kvbridge.transport.tcp_recv import Receiver, TcpRecvHandle
from kvbridge.transport.tcp_server import BlockServer, PublishedTransfer, Resolver

DEFAULT_CHUNK_BYTES = 1024 * 1024
DEFAULT_SOCK_BUF_BYTES = 4 * 1024 * 1024


def pull_spec(handle: KVHandle, num_held: int = 0) -> TransferSpec:
    """The spec that pulls a finished prefill's blocks (by slot and generation) from the
    handle's block server, all but the first ``num_held`` (which the consumer holds)."""
    layout = handle.layout
    return TransferSpec("", layout.num_layers, (len(handle.block_slots) - num_held) * layout.block_bytes,
                        endpoint=handle.source_endpoint, source_slots=handle.block_slots,
                        pool_name=handle.pool_name, source_gens=handle.block_gens, num_held=num_held)


class TcpTransport(Transport):
    """One per node: its block server (producer side, started lazily) and its pulls."""

    name = "tcp"
    pulls_by_handle = True

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
        self.connections = ConnectionPool(token=token, peer="tcp-recv", connect_timeout_s=connect_timeout_s,
                                          sock_buf_bytes=sock_buf_bytes)
        self._server: BlockServer | None = None
        self._receiver: Receiver | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, options: TransportOptions) -> TcpTransport:
        """Its block server on ``options.host``, a free port."""
        return cls(options.host, 0, token=options.token, timeout_s=options.timeout_s,
                   connect_timeout_s=options.connect_timeout_s)

    @property
    def server(self) -> BlockServer:
        with self._lock:
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

    def serve_pool(self, pool: HostBlockPool, allocator: SlotAllocator, resolver: Resolver | None = None) -> None:
        """Lets peers pull (tcp) or pin and map (shm) slots of ``pool`` by KV handle, and with
        ``resolver`` find the slots of a chain of block hashes (``resolve``)."""
        self.server.serve_pool(pool, allocator, resolver)

    def resolve(self, endpoint: str, block_hashes: Sequence[bytes], timeout_s: float) -> ResolveReply:
        """The slots and generations of the longest prefix of ``block_hashes`` that the node at
        ``endpoint`` holds (nothing pinned). Errors: KVBridgeError or OSError."""
        sock = self.connections.acquire(endpoint)
        try:
            sock.settimeout(timeout_s)
            sock.sendall(encode_frame(ResolveRequest(tuple(block_hashes))))
            reply = expect_reply(recv_message(sock), ResolveReply)
        except BaseException:
            sock.close()
            raise
        self.connections.release(endpoint, sock)
        return reply

    def release(self, handle: KVHandle, timeout_s: float) -> None:
        """Tells ``handle``'s block server that this consumer is done with the handle's slots
        without moving a byte (it holds every block): a pin by generation, granted, then
        unpinned, so the producer's lease ends as after a pull. Errors: KVBridgeError (e.g.
        RemoteError("stale")) or OSError; the connection is then closed."""
        endpoint = handle.source_endpoint
        sock = self.connections.acquire(endpoint)
        try:
            sock.settimeout(timeout_s)
            sock.sendall(encode_frame(PinRequest(handle.pool_name, handle.block_slots, timeout_s, handle.block_gens)))
            expect_reply(recv_message(sock), PinGranted)
            sock.sendall(encode_frame(Unpin(len(handle.block_slots))))
        except BaseException:
            sock.close()
            raise
        self.connections.release(endpoint, sock)

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
        with self._lock:
            if self._receiver is None:
                self._receiver = Receiver(self.connections)
            receiver = self._receiver
        return TcpRecvHandle(spec, dest, checksum_on=self.checksum, timeout_s=self.timeout_s,
                             pool=self.connections, receiver=receiver)

    def close(self) -> None:
        with self._lock:
            receiver, self._receiver = self._receiver, None
            server, self._server = self._server, None
        if receiver is not None:
            receiver.close()
        self.connections.close()
        if server is not None:
            server.close()
