"""tcp transport: checksums verified on receipt, pooled connections, background receive,
ordered close, stale KV handles refused."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import xxhash
from transport_procs import LAYOUT, Side, assert_pattern, eventually, pattern

from kvbridge.auth import HelloAck
from kvbridge.errors import ChecksumMismatch, RemoteError
from kvbridge.handle import KVHandle, KVLayoutSpec
from kvbridge.protocol import encode_frame
from kvbridge.transport.base import TransferSpec
from kvbridge.transport.messages import ChunkHeader, PinRequest, PullRequest
from kvbridge.transport.regions import PoolRegion
from kvbridge.transport.tcp import TcpTransport, pull_spec


@pytest.fixture()
def sides() -> Iterator[tuple[Side, Side]]:
    src, dst = Side(source=True), Side(source=False)
    yield src, dst
    src.pool.close()
    dst.pool.close()


def slot_pull_spec(endpoint: str, src: Side) -> TransferSpec:
    return TransferSpec("", LAYOUT.num_layers, 3 * LAYOUT.block_bytes, endpoint=endpoint,
                        source_slots=src.slots, pool_name=src.pool.handle.name,
                        source_gens=src.alloc.generations(src.slots))


def handle_for(endpoint: str, src: Side) -> KVHandle:
    """A KV handle for the source slots as they are now (their current generations)."""
    layout = KVLayoutSpec("uint8", LAYOUT.num_layers, 16, 256, 256)
    handle = KVHandle(request_id="r1", block_hashes=(b"a", b"b"), num_tokens=40, source_endpoint=endpoint,
                      source_node="p0", tier="active", layout=layout, transport="tcp",
                      pool_name=src.pool.handle.name, block_slots=src.slots,
                      block_gens=src.alloc.generations(src.slots))
    return KVHandle.from_bytes(handle.to_bytes())


class CorruptingProxy:
    """A real TCP relay to ``target`` that flips one byte of the server-to-client stream."""

    def __init__(self, target: str, flip_at: int) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._flip_at = flip_at
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def _serve(self) -> None:
        client, _ = self._listener.accept()
        server = socket.create_connection(self._target)
        self._socks += [client, server]
        up = threading.Thread(target=self._relay, args=(client, server, -1), daemon=True)
        self._threads.append(up)
        up.start()
        self._relay(server, client, self._flip_at)

    @staticmethod
    def _relay(src: socket.socket, dst: socket.socket, flip_at: int) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := bytearray(src.recv(65536)):
                if 0 <= flip_at - seen < len(data):
                    data[flip_at - seen] ^= 0xFF
                seen += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        for sock in self._socks:
            sock.close()
        for thread in self._threads[1:]:
            thread.join(5)


def test_corrupted_chunk_raises_checksum_mismatch(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    server, client = TcpTransport(), TcpTransport()
    server.serve_pool(src.pool, src.alloc)
    proxy = CorruptingProxy(server.endpoint, flip_at=500)  # HelloAck + ChunkHeader < 100 bytes: in layer 0
    try:
        recv = client.start_recv(slot_pull_spec(proxy.endpoint, src), dst.region())
        with pytest.raises(ChecksumMismatch) as info:
            recv.wait(time.monotonic() + 10)
        # all four layers were published, so they travel as one 48 KiB chunk with one checksum
        got = np.concatenate([dst.pool.block(layer, s) for layer in range(4) for s in dst.slots])
        sent = np.concatenate([pattern(layer, k) for layer in range(4) for k in range(3)])
        want = xxhash.xxh3_64_intdigest(sent)
        framing = len(encode_frame(HelloAck("kvbridge-block-server"))) + len(encode_frame(ChunkHeader(0, 0, 49152, want)))
        assert np.flatnonzero(got != sent).tolist() == [500 - framing]  # the one byte the proxy flipped
        assert str(info.value) == (
            f"checksum mismatch in layer 0 at offset 0 (49152 bytes) from {proxy.endpoint}: "
            f"xxh3_64 {xxhash.xxh3_64_intdigest(got):#018x}, sender said {want:#018x}"
        )
        assert recv.poll() == 0
        recv.close()
        assert eventually(lambda: src.alloc.refcount(src.slots[0]) == 1)  # the server unpinned
        src.release_and_check()
        dst.release_and_check()
    finally:
        proxy.close()
        server.close()
        client.close()


def test_pulls_reuse_one_connection(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    server, client = TcpTransport(), TcpTransport()
    server.serve_pool(src.pool, src.alloc)
    try:
        spec = slot_pull_spec(server.endpoint, src)
        for _ in range(3):
            dst.pool.array[:] = 0
            recv = client.start_recv(spec, dst.region())
            recv.wait(time.monotonic() + 10)
            recv.close()
            assert_pattern(dst.pool, dst.slots)
            assert client.connections.num_idle(server.endpoint) == 1
        assert server.server.connections_accepted == 1
        assert eventually(lambda: src.alloc.refcount(src.slots[0]) == 1)
        src.release_and_check()
        dst.release_and_check()
    finally:
        server.close()
        client.close()


def test_poll_reports_progress_without_wait_and_close_stops_writes(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    producer, consumer = TcpTransport(), TcpTransport()
    try:
        spec = producer.spec_for("xfer-bg", LAYOUT.num_layers, 3 * LAYOUT.block_bytes, src.slots)
        send = producer.start_send(spec, src.region(), pins=src.alloc)
        recv = consumer.start_recv(spec, dst.region())
        send.publish_layer(0)
        send.publish_layer(1)
        assert eventually(lambda: recv.poll() == 2)  # the receiver thread made progress on its own
        assert send.poll() == 2
        recv.close()
        send.publish_layer(2)
        send.publish_layer(3)
        time.sleep(0.1)
        assert recv.poll() == 2
        np.testing.assert_array_equal(dst.pool.block(1, dst.slots[2]), pattern(1, 2))
        assert not dst.pool.array[2:].any()  # nothing written after close()
        send.close()
        src.release_and_check()
        dst.release_and_check()
    finally:
        producer.close()
        consumer.close()


def test_concurrent_pulls_share_one_receiver(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    server, client = TcpTransport(), TcpTransport()
    server.serve_pool(src.pool, src.alloc)
    dst.alloc.free(dst.slots)
    try:
        spec = slot_pull_spec(server.endpoint, src)
        # the third region shares slot 2 with the first: both write the same bytes there
        regions = [PoolRegion(dst.pool.array, slots) for slots in ((0, 1, 2), (3, 4, 5), (7, 6, 2))]
        errors: list[BaseException] = []

        def pull(region: PoolRegion) -> None:
            try:
                recv = client.start_recv(spec, region)
                recv.wait(time.monotonic() + 10)
                recv.close()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=pull, args=(r,)) for r in regions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert errors == []
        for slots in ((0, 1, 2), (3, 4, 5), (7, 6, 2)):
            assert_pattern(dst.pool, slots)
        assert 1 <= client.connections.num_idle(server.endpoint) <= 3
        assert eventually(lambda: src.alloc.refcount(src.slots[0]) == 1)
        src.release_and_check()
    finally:
        server.close()
        client.close()


def test_transport_close_fails_open_pulls(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    producer, consumer = TcpTransport(), TcpTransport()
    try:
        spec = producer.spec_for("xfer-close", LAYOUT.num_layers, 3 * LAYOUT.block_bytes, src.slots)
        send = producer.start_send(spec, src.region(), pins=src.alloc)
        recv = consumer.start_recv(spec, dst.region())
        send.publish_layer(0)
        assert eventually(lambda: recv.poll() == 1)
        consumer.close()  # the receiver thread stops: the open pull fails, its waiter does not hang
        with pytest.raises(RemoteError, match=r"^remote error \[closed\]: tcp transport closed during xfer-close$"):
            recv.wait(time.monotonic() + 5)
        recv.close()
        send.close()
        src.release_and_check()
        dst.release_and_check()
    finally:
        producer.close()
        consumer.close()


def test_pull_of_freed_and_reused_slot_is_stale(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    server, client = TcpTransport(), TcpTransport()
    server.serve_pool(src.pool, src.alloc)
    try:
        handle = handle_for(server.endpoint, src)
        assert pull_spec(handle).source_gens == (1, 1, 1)
        src.alloc.free([5])  # the producer's lease ended ...
        assert src.alloc.allocate(6) == [6, 7, 0, 3, 4, 5]  # ... and slot 5 went to another sequence
        recv = client.start_recv(pull_spec(handle), dst.region())
        with pytest.raises(RemoteError, match=r"^remote error \[stale\]: stale slot 5: expected generation 1, "
                                              r"current generation 2$") as info:
            recv.wait(time.monotonic() + 5)
        assert (info.value.code, recv.poll()) == ("stale", 0)
        recv.close()
        assert not dst.pool.array.any()
        assert [src.alloc.refcount(s) for s in range(LAYOUT.num_slots)] == [1] * LAYOUT.num_slots  # none pinned
        assert client.connections.num_idle(server.endpoint) == 0  # the refused pull's connection was closed
        recv = client.start_recv(pull_spec(handle_for(server.endpoint, src)), dst.region())
        recv.wait(time.monotonic() + 10)  # the server keeps serving: a current handle pulls
        recv.close()
        assert_pattern(dst.pool, dst.slots)
        assert eventually(lambda: [src.alloc.refcount(s) for s in range(LAYOUT.num_slots)] == [1] * LAYOUT.num_slots)
        assert server.server.connections_accepted == 2
        src.alloc.free([6, 7, 0, 3, 4])  # slot 5 is freed with src.slots below
        src.release_and_check()
        dst.release_and_check()
    finally:
        server.close()
        client.close()


def test_slot_generations_must_match_the_slots() -> None:
    with pytest.raises(ValueError, match=r"^source_gens: expected 3 generations \(one per source slot\), got 1$"):
        TransferSpec("", 4, 3 * LAYOUT.block_bytes, endpoint="127.0.0.1:9", source_slots=(1, 2, 5), source_gens=(1,))
    with pytest.raises(ValueError, match=r"^source_gens: expected 2 generations \(one per source slot\), got 0$"):
        TransferSpec("", 4, 2 * LAYOUT.block_bytes, endpoint="127.0.0.1:9", source_slots=(1, 2))
    with pytest.raises(ValueError, match=r"^gens: expected 2 generations \(one per slot\), got 3$"):
        PullRequest("", (1, 2), "", 4, 8192, 5.0, True, (1, 1, 1))
    with pytest.raises(ValueError, match=r"^gens: a published transfer is pulled by id, not by slot generations$"):
        PullRequest("xfer-1", (1,), "", 4, 4096, 5.0, True, (1,))
    with pytest.raises(ValueError, match=r"^gens: expected generations >= 0, got \[1, -1\]$"):
        PinRequest("kvb-pool-x", (1, 2), 5.0, (1, -1))
    with pytest.raises(ValueError, match=r"^gens: expected 2 generations \(one per slot\), got 0$"):
        PinRequest("kvb-pool-x", (1, 2), 5.0)
    with pytest.raises(ValueError, match=r"^gens: expected 1 generations \(one per slot\), got 0$"):
        PullRequest("", (1,), "", 4, 4096, 5.0, True)
