"""The nixl transport on host memory: two OS processes exchange a multi-layer payload layer by
layer (bytes identical, layer 0 seen before the producer writes the last layer, nothing leaked),
and deadlines and early closes on either side end the transfer with a clear error.

Skips when the ``nixl`` package is missing or NIXL cannot create a UCX backend here."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import numpy as np
import pytest
from transport_procs import LAYOUT, Side, assert_pattern, fill_pattern, pattern, source_slots

from kvbridge.errors import RemoteError, TransferTimeout, TransportUnavailable
from kvbridge.pool import HostBlockPool
from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import TransferSpec
from kvbridge.transport.nixl import NixlTransferSpec, NixlTransport, nixl_available
from kvbridge.transport.regions import PoolRegion
from kvbridge.transport.registry import get_transport

pytestmark = pytest.mark.skipif(not nixl_available(), reason="nixl is not installed (pip install nixl-cu12)")
LAYER_NBYTES = 3 * LAYOUT.block_bytes


@pytest.fixture(scope="module", autouse=True)
def nixl_works() -> None:
    try:
        NixlTransport().close()
    except TransportUnavailable as exc:
        pytest.skip(f"nixl cannot run here: {exc}")


@pytest.fixture()
def sides() -> Iterator[tuple[Side, Side]]:
    src, dst = Side(source=True), Side(source=False)
    yield src, dst
    src.pool.close()
    dst.pool.close()


def producer(conn: Connection) -> None:
    """Writes and publishes layer 0, waits for the consumer's ack of layer 0, then the rest."""
    transport = get_transport("nixl")()
    assert isinstance(transport, NixlTransport)
    pool = HostBlockPool.create(LAYOUT)
    alloc = SlotAllocator(LAYOUT.num_slots)
    slots = source_slots(alloc)
    spec = TransferSpec("xfer-1", LAYOUT.num_layers, LAYER_NBYTES, source_slots=slots)
    send = transport.start_send(spec, PoolRegion(pool.array, slots), pins=alloc)
    conn.send(send.spec)
    for layer in range(LAYOUT.num_layers):
        if layer == LAYOUT.num_layers - 1 and (not conn.poll(30) or conn.recv() != "ack0"):
            raise RuntimeError("no ack of layer 0")
        fill_pattern(pool, layer, slots)
        send.publish_layer(layer)
    send.wait(time.monotonic() + 30)
    acked = send.poll()
    send.close()
    alloc.check_integrity()
    refs = [alloc.refcount(s) for s in slots]
    alloc.free(slots)
    conn.send((acked, refs, alloc.num_free, transport.num_registered))
    conn.recv()  # the consumer is done reading our memory
    transport.close()
    pool.close()


def test_two_process_layerwise_exchange() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=producer, args=(child,), daemon=True)
    proc.start()
    transport = NixlTransport()
    dest = HostBlockPool.create(LAYOUT)
    try:
        slots = (3, 0, 2)  # a different order and split than the source's (1, 2, 5)
        assert parent.poll(60)
        spec = parent.recv()
        assert isinstance(spec, NixlTransferSpec)
        recv = transport.start_recv(spec, PoolRegion(dest.array, slots))
        recv.wait_layer(0, time.monotonic() + 30)
        assert recv.poll() in (1, 2, 3)  # the producer is blocked on our ack before the last layer
        assert all((dest.block(0, s) == pattern(0, k)).all() for k, s in enumerate(slots))
        assert not dest.array[3].any()
        parent.send("ack0")
        recv.wait(time.monotonic() + 30)
        assert recv.poll() == 4
        recv.close()
        recv.close()
        assert transport.num_registered == 0
        assert_pattern(dest, slots)
        assert not dest.array[:, [1, 4, 5, 6, 7]].any()
        assert parent.poll(30)
        assert parent.recv() == (4, [1, 1, 1], 8, 0)  # all acked, pins released, slots freed, unregistered
        parent.send("bye")
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        transport.close()
        dest.close()
        if proc.is_alive():
            proc.kill()


def test_receiver_deadline_raises_and_leaks_nothing(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    producer_t, consumer_t = NixlTransport(), NixlTransport()
    try:
        spec = TransferSpec("xfer-1", LAYOUT.num_layers, LAYER_NBYTES, source_slots=src.slots)
        send = producer_t.start_send(spec, src.region(), pins=src.alloc)
        assert [src.alloc.refcount(s) for s in src.slots] == [2, 2, 2]
        send.publish_layer(0)  # the producer never gets to layer 1
        recv = consumer_t.start_recv(send.spec, dst.region())
        with pytest.raises(TransferTimeout, match=r"^nixl recv xfer-1 timed out after 0.2\d\ds; "
                                                  r"pending: layers \[1, 2, 3\]$"):
            recv.wait(time.monotonic() + 0.2)
        assert recv.poll() == 1
        assert send.poll() == 1
        for k, slot in enumerate(dst.slots):
            np.testing.assert_array_equal(dst.pool.block(0, slot), pattern(0, k))
        assert not dst.pool.array[1:].any()
        recv.close()
        with pytest.raises(RemoteError, match=r"^remote error \[aborted\]: nixl transfer xfer-1: the consumer gave up$"):
            send.wait(time.monotonic() + 5)
        send.close()
        send.close()
        assert (producer_t.num_registered, consumer_t.num_registered) == (0, 0)
        src.release_and_check()
        dst.release_and_check()
    finally:
        producer_t.close()
        consumer_t.close()


def test_sender_deadline_raises_and_leaks_nothing(sides: tuple[Side, Side]) -> None:
    src, _ = sides
    transport = NixlTransport()
    try:
        spec = TransferSpec("xfer-2", LAYOUT.num_layers, LAYER_NBYTES, source_slots=src.slots)
        send = transport.start_send(spec, src.region(), pins=src.alloc)
        for layer in range(LAYOUT.num_layers):
            send.publish_layer(layer)
        with pytest.raises(TransferTimeout, match=r"^nixl send xfer-2 timed out after 0.1\d\ds; "
                                                  r"pending: consumer acks for layers \[0, 1, 2, 3\]$"):
            send.wait(time.monotonic() + 0.1)
        send.close()
        assert transport.num_registered == 0
        src.release_and_check()
    finally:
        transport.close()


def test_producer_close_fails_the_consumer_fast(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    producer_t, consumer_t = NixlTransport(), NixlTransport()
    try:
        spec = TransferSpec("xfer-3", LAYOUT.num_layers, LAYER_NBYTES, source_slots=src.slots)
        send = producer_t.start_send(spec, src.region(), pins=src.alloc)
        send.publish_layer(0)
        recv = consumer_t.start_recv(send.spec, dst.region())
        recv.wait_layer(0, time.monotonic() + 5)
        send.close()
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"nixl transfer xfer-3: "):
            recv.wait(time.monotonic() + 5)
        assert time.monotonic() - start < 2
        recv.close()
        assert (producer_t.num_registered, consumer_t.num_registered) == (0, 0)
        src.release_and_check()
        dst.release_and_check()
    finally:
        producer_t.close()
        consumer_t.close()


def test_caller_mistakes_are_value_errors(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    transport = NixlTransport()
    try:
        spec = TransferSpec("xfer-4", LAYOUT.num_layers, LAYER_NBYTES, source_slots=src.slots)
        with pytest.raises(ValueError, match=r"^spec: nixl needs the NixlTransferSpec from the send handle, "
                                             r"got TransferSpec$"):
            transport.start_recv(spec, dst.region())
        send = transport.start_send(spec, src.region())
        with pytest.raises(ValueError, match=r"^spec.transfer_id: 'xfer-4' is already being sent by this transport$"):
            transport.start_send(spec, src.region())
        with pytest.raises(ValueError, match=r"^layer: expected to publish layer 0 next, got 1$"):
            send.publish_layer(1)
        send.close()
        assert transport.num_registered == 0
    finally:
        transport.close()
