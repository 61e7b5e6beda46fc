"""shm pull by KV handle: slots pinned through the block server for the pull, released after
unpin, on a deadline, on an abandoned pin; a stale handle (slots freed and reused) is refused;
nothing leaks on either side."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from transport_procs import LAYOUT, Side, assert_pattern, eventually

from kvbridge.auth import Hello, HelloAck
from kvbridge.errors import RemoteError, TransferTimeout
from kvbridge.handle import KVHandle, KVLayoutSpec
from kvbridge.protocol import ErrorReply, encode_frame, recv_message
from kvbridge.transport.messages import PinGranted, PinRequest
from kvbridge.transport.shm import ShmTransport, shm_pull_spec
from kvbridge.transport.tcp import TcpTransport


@pytest.fixture()
def sides() -> Iterator[tuple[Side, Side]]:
    src, dst = Side(source=True), Side(source=False)
    yield src, dst
    src.pool.close()
    dst.pool.close()


@pytest.fixture()
def server(sides: tuple[Side, Side]) -> Iterator[TcpTransport]:
    """The producer node's block server, serving the source pool."""
    src, _ = sides
    transport = TcpTransport()
    transport.serve_pool(src.pool, src.alloc)
    yield transport
    transport.close()


def handle_for(server: TcpTransport, src: Side) -> KVHandle:
    layout = KVLayoutSpec("uint8", LAYOUT.num_layers, 16, 256, 256)
    handle = KVHandle(request_id="r1", block_hashes=(b"a", b"b"), num_tokens=40, source_endpoint=server.endpoint,
                      source_node="p0", tier="active", layout=layout, transport="shm",
                      pool_name=src.pool.handle.name, block_slots=src.slots,
                      block_gens=src.alloc.generations(src.slots))
    return KVHandle.from_bytes(handle.to_bytes())


def refs(side: Side) -> list[int]:
    return [side.alloc.refcount(s) for s in side.slots]


def assert_copied(dst: Side) -> None:
    assert_pattern(dst.pool, dst.slots)


def test_slot_freed_during_pull_returns_only_after_unpin(sides: tuple[Side, Side], server: TcpTransport) -> None:
    src, dst = sides
    consumer = ShmTransport()
    try:
        recv = consumer.start_recv(shm_pull_spec(handle_for(server, src)), dst.region())
        assert refs(src) == [2, 2, 2]  # pinned before start_recv returned
        src.alloc.free(src.slots)  # the prefill releases its blocks mid-pull
        assert (refs(src), src.alloc.num_free) == ([1, 1, 1], LAYOUT.num_slots - 3)
        recv.wait_layer(1, time.monotonic() + 5)
        assert recv.poll() == 2
        assert (refs(src), src.alloc.num_free) == ([1, 1, 1], LAYOUT.num_slots - 3)
        recv.wait(time.monotonic() + 5)
        recv.close()
        assert_copied(dst)
        assert eventually(lambda: src.alloc.num_free == LAYOUT.num_slots)  # back only after the unpin
        src.alloc.check_integrity()
        assert consumer.connections.num_idle(server.endpoint) == 1  # the pin connection is pooled
        dst.release_and_check()
    finally:
        consumer.close()


def test_pull_past_deadline_leaks_nothing(sides: tuple[Side, Side], server: TcpTransport) -> None:
    src, dst = sides
    consumer = ShmTransport()
    try:
        recv = consumer.start_recv(shm_pull_spec(handle_for(server, src)), dst.region())
        with pytest.raises(TransferTimeout, match=rf"^shm pull from {server.endpoint} timed out after 0.000s; "
                                                  r"pending: layers \[0, 1, 2, 3\]$"):
            recv.wait(time.monotonic())
        assert recv.poll() == 0
        recv.close()
        assert eventually(lambda: refs(src) == [1, 1, 1])  # the dropped connection unpinned
        assert consumer.connections.num_idle(server.endpoint) == 0
        src.release_and_check()
        dst.release_and_check()
    finally:
        consumer.close()


def test_pull_after_pin_expiry_fails_and_leaks_nothing(sides: tuple[Side, Side], server: TcpTransport) -> None:
    src, dst = sides
    consumer = ShmTransport(timeout_s=0.2)
    try:
        recv = consumer.start_recv(shm_pull_spec(handle_for(server, src)), dst.region())
        assert eventually(lambda: refs(src) == [1, 1, 1])  # the server's pin expired
        with pytest.raises(TransferTimeout, match=rf"^shm pull from {server.endpoint}: pin timed out after 0.200s; "
                                                  r"pending: layers \[0, 1, 2, 3\]$"):
            recv.wait(time.monotonic() + 5)
        recv.close()
        assert not dst.pool.array.any()  # nothing was copied from unpinned slots
        src.release_and_check()
        dst.release_and_check()
    finally:
        consumer.close()


def test_abandoned_pin_expires_and_server_keeps_serving(sides: tuple[Side, Side], server: TcpTransport) -> None:
    src, dst = sides
    host, _, port = server.endpoint.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(encode_frame(Hello("", "abandoner")))
        assert recv_message(raw) == HelloAck("kvbridge-block-server")
        raw.sendall(encode_frame(PinRequest(src.pool.handle.name, src.slots, 0.2, src.alloc.generations(src.slots))))
        assert recv_message(raw) == PinGranted(src.pool.handle)
        assert refs(src) == [2, 2, 2]
        assert recv_message(raw) == ErrorReply("timeout", "shm pin of 3 slots timed out after 0.200s; "
                                                          "pending: the consumer's unpin")
        assert eventually(lambda: refs(src) == [1, 1, 1])  # unpinned right after telling the consumer
    consumer = ShmTransport()
    try:
        recv = consumer.start_recv(shm_pull_spec(handle_for(server, src)), dst.region())
        recv.wait(time.monotonic() + 5)
        recv.close()
        assert_copied(dst)
        assert eventually(lambda: refs(src) == [1, 1, 1])
        src.release_and_check()
        dst.release_and_check()
    finally:
        consumer.close()


def test_pin_of_another_pool_or_free_slot_is_refused(sides: tuple[Side, Side], server: TcpTransport) -> None:
    src, dst = sides
    consumer = ShmTransport()
    try:
        spec = shm_pull_spec(handle_for(server, src))
        other = type(spec)("", spec.num_layers, spec.layer_nbytes, endpoint=spec.endpoint,
                           source_slots=spec.source_slots, pool_name="kvb-pool-other",
                           source_gens=spec.source_gens)
        with pytest.raises(RemoteError, match=rf"\[invalid\]: pool_name: this block server serves pool "
                                              rf"'{src.pool.handle.name}', not 'kvb-pool-other'"):
            consumer.start_recv(other, dst.region())
        free_slot = type(spec)("", spec.num_layers, spec.layer_nbytes, endpoint=spec.endpoint,
                               source_slots=(1, 2, 7), pool_name=spec.pool_name,
                               source_gens=(*spec.source_gens[:2], 1))
        with pytest.raises(RemoteError, match=r"\[stale\]: stale slot 7: expected generation 1, current generation 0 \(free\)$"):
            consumer.start_recv(free_slot, dst.region())
        assert refs(src) == [1, 1, 1]
        src.release_and_check()
        dst.release_and_check()
    finally:
        consumer.close()


def test_pull_of_freed_and_reused_slot_is_stale(sides: tuple[Side, Side], server: TcpTransport) -> None:
    src, dst = sides
    consumer = ShmTransport()
    try:
        handle = handle_for(server, src)
        assert handle.block_gens == (1, 1, 1)
        src.alloc.free([2])  # the producer's lease ended ...
        assert src.alloc.allocate(6) == [6, 7, 0, 3, 4, 2]  # ... and slot 2 went to another sequence
        assert src.alloc.generations(src.slots) == (1, 2, 1)
        with pytest.raises(RemoteError, match=r"^remote error \[stale\]: stale slot 2: expected generation 1, "
                                              r"current generation 2$") as info:
            consumer.start_recv(shm_pull_spec(handle), dst.region())
        assert info.value.code == "stale"
        assert [src.alloc.refcount(s) for s in range(LAYOUT.num_slots)] == [1] * LAYOUT.num_slots  # none pinned
        assert not dst.pool.array.any()
        assert consumer.connections.num_idle(server.endpoint) == 0  # the refused connection was closed
        fresh = handle_for(server, src)  # the server keeps serving: a current handle pulls
        assert fresh.block_gens == (1, 2, 1)
        recv = consumer.start_recv(shm_pull_spec(fresh), dst.region())
        recv.wait(time.monotonic() + 5)
        recv.close()
        assert_copied(dst)
        assert eventually(lambda: [src.alloc.refcount(s) for s in range(LAYOUT.num_slots)] == [1] * LAYOUT.num_slots)
        src.alloc.free([6, 7, 0, 3, 4])  # slot 2 is freed with src.slots below
        src.release_and_check()
        dst.release_and_check()
    finally:
        consumer.close()
