"""Transfers past their deadline, pulls by KV handle, auth, registry and the nixl guard
(the deepep adapter's tests are in test_transport_deepep.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from transport_procs import LAYOUT, Side, assert_pattern, pattern

from kvbridge.errors import RemoteError, TransferTimeout, TransportUnavailable
from kvbridge.handle import KVHandle, KVLayoutSpec
from kvbridge.transport import nixl_agent
from kvbridge.transport.base import TransferSpec
from kvbridge.transport.nixl import NixlTransport, nixl_available
from kvbridge.transport.regions import PoolRegion
from kvbridge.transport.registry import get_transport
from kvbridge.transport.shm import ShmTransport
from kvbridge.transport.tcp import TcpTransport, pull_spec


@pytest.fixture()
def sides() -> Iterator[tuple[Side, Side]]:
    src, dst = Side(source=True), Side(source=False)
    yield src, dst
    src.pool.close()
    dst.pool.close()


def spec_for(name: str, transport: object, src: Side) -> TransferSpec:
    nbytes = 3 * LAYOUT.block_bytes
    if name == "tcp":
        assert isinstance(transport, TcpTransport)
        return transport.spec_for("xfer-1", LAYOUT.num_layers, nbytes, src.slots)
    return TransferSpec("xfer-1", LAYOUT.num_layers, nbytes, pool=src.pool.handle, source_slots=src.slots)


@pytest.mark.parametrize("name", ["shm", "tcp"])
def test_receiver_deadline_raises_and_leaks_nothing(name: str, sides: tuple[Side, Side]) -> None:
    src, dst = sides
    producer, consumer = get_transport(name)(), get_transport(name)()
    try:
        spec = spec_for(name, producer, src)
        send = producer.start_send(spec, src.region(), pins=src.alloc)
        assert [src.alloc.refcount(s) for s in src.slots] == [2, 2, 2]
        send.publish_layer(0)  # the producer never gets to layer 1
        recv = consumer.start_recv(spec, dst.region())
        where = " from " + spec.endpoint if name == "tcp" else ""
        with pytest.raises(TransferTimeout, match=rf"{name} recv xfer-1{where} timed out after 0.2\d\ds; "
                                                  r"pending: layers \[1, 2, 3\]$"):
            recv.wait(time.monotonic() + 0.2)
        assert recv.poll() == 1
        np.testing.assert_array_equal(dst.pool.block(0, 0), pattern(0, 0))
        recv.close()
        with pytest.raises((RemoteError, TransferTimeout)) as info:
            send.wait(time.monotonic() + 0.3)
        expected = ("remote error [aborted]: shm transfer xfer-1: the consumer gave up" if name == "shm"
                    else "tcp send xfer-1 timed out after 0.3")
        assert str(info.value).startswith(expected)
        send.close()
        send.close()
        src.release_and_check()
        dst.release_and_check()
    finally:
        producer.close()
        consumer.close()


def test_source_side_deadline_ends_the_pull(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    producer, consumer = TcpTransport(), TcpTransport(timeout_s=0.2)
    try:
        spec = spec_for("tcp", producer, src)
        send = producer.start_send(spec, src.region(), pins=src.alloc)
        send.publish_layer(0)
        recv = consumer.start_recv(spec, dst.region())
        with pytest.raises(RemoteError, match=r"\[timeout\]: tcp serve xfer-1 timed out after 0.2\d\ds; "
                                              r"pending: producer publishing layers \[1, 2, 3\]"):
            recv.wait(time.monotonic() + 10)
        with pytest.raises(TransferTimeout, match="tcp serve xfer-1 timed out"):
            send.wait(time.monotonic() + 10)
        recv.close()
        send.close()
        src.release_and_check()
        dst.release_and_check()
    finally:
        producer.close()
        consumer.close()


def test_pull_by_kv_handle_pins_until_done(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    server, client = TcpTransport(token="s3"), TcpTransport(token="s3")
    try:
        server.serve_pool(src.pool, src.alloc)
        layout = KVLayoutSpec("uint8", LAYOUT.num_layers, 16, 256, 256)
        handle = KVHandle(request_id="r1", block_hashes=(b"a", b"b"), num_tokens=40, source_endpoint=server.endpoint,
                          source_node="p0", tier="active", layout=layout, transport="tcp",
                          pool_name=src.pool.handle.name, block_slots=src.slots,
                          block_gens=src.alloc.generations(src.slots))
        handle = KVHandle.from_bytes(handle.to_bytes())
        recv = client.start_recv(pull_spec(handle), dst.region())
        recv.wait(time.monotonic() + 10)
        recv.close()
        assert_pattern(dst.pool, dst.slots)
        deadline = time.monotonic() + 5
        while src.alloc.refcount(src.slots[0]) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the server unpins right after the receiver's PullDone
        bad = TransferSpec("", LAYOUT.num_layers, LAYOUT.block_bytes, endpoint=server.endpoint, source_slots=(7,),
                           source_gens=(1,))
        one = PoolRegion(dst.pool.array, (3,))
        with pytest.raises(RemoteError, match=r"\[stale\]: stale slot 7: expected generation 1, current generation 0 \(free\)$"):
            client.start_recv(bad, one).wait(time.monotonic() + 5)
        with pytest.raises(RemoteError, match=r"\[auth\]: bad token from peer 'tcp-recv'"):
            TcpTransport(token="nope").start_recv(bad, one)
        src.release_and_check()
        dst.release_and_check()
    finally:
        server.close()
        client.close()


def test_registry() -> None:
    assert get_transport("shm") is ShmTransport
    assert get_transport("tcp") is TcpTransport
    with pytest.raises(ValueError, match=r"unknown transport 'udp' \(known: \['deepep', 'nixl', 'shm', 'tcp'\]\)"):
        get_transport("udp")


def test_block_server_refuses_exposed_bind_without_token() -> None:
    with pytest.raises(ValueError, match=r"binding '0.0.0.0' beyond loopback requires a token"):
        _ = TcpTransport(host="0.0.0.0").endpoint


def test_nixl_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules is how Python marks a module unimportable: nixl's real import
    # guard then sees no package, whether or not one is installed here
    for module in nixl_agent._MODULES:
        monkeypatch.setitem(sys.modules, module, None)
    assert not nixl_available()
    with pytest.raises(TransportUnavailable, match=r"^transport 'nixl' needs the 'nixl' package "
                                                   r"\(pip install nixl-cu12\), not installed$"):
        NixlTransport()
