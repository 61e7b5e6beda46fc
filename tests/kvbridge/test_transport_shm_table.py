"""The shm transport's per-pool control table: entry reuse, generations, early close, duplicates."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from transport_procs import LAYOUT, Side, assert_pattern

from kvbridge.errors import RemoteError
from kvbridge.transport.base import TransferSpec
from kvbridge.transport.shm import ShmTransport
from kvbridge.transport.shm_control import GEN, table_path


@pytest.fixture()
def sides() -> Iterator[tuple[Side, Side]]:
    src, dst = Side(source=True), Side(source=False)
    yield src, dst
    src.pool.close()
    dst.pool.close()


def spec(transfer_id: str, src: Side) -> TransferSpec:
    return TransferSpec(transfer_id, LAYOUT.num_layers, 3 * LAYOUT.block_bytes, pool=src.pool.handle,
                        source_slots=src.slots)


def assert_received(dst: Side) -> None:
    assert_pattern(dst.pool, dst.slots)


def test_sequential_transfers_reuse_one_entry(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    producer, consumer = ShmTransport(), ShmTransport()
    try:
        for i in range(20):
            dst.pool.array[:] = 0
            send = producer.start_send(spec(f"xfer-{i}", src), src.region(), pins=src.alloc)
            recv = consumer.start_recv(spec(f"xfer-{i}", src), dst.region())
            for layer in range(LAYOUT.num_layers):
                send.publish_layer(layer)
            recv.wait(time.monotonic() + 10)
            send.wait(time.monotonic() + 10)
            table = producer.control_table(src.pool.handle.name)
            assert table is not None
            assert table.view.get(0, GEN) == i + 1  # entry 0, generation i + 1
            recv.close()
            send.close()
            assert_received(dst)
            assert (table.high_water, table.num_in_use) == (1, 0)
        src.release_and_check()
        dst.release_and_check()
    finally:
        producer.close()
        consumer.close()
    with pytest.raises(FileNotFoundError):
        open(table_path(src.pool.handle.name), "rb")  # noqa: SIM115  (the producer's close unlinks it)


def test_stale_consumer_of_a_reused_entry_fails_cleanly(sides: tuple[Side, Side]) -> None:
    src, dst = sides
    producer, consumer = ShmTransport(reclaim_grace_s=0.0), ShmTransport()
    try:
        send = producer.start_send(spec("xfer-1", src), src.region(), pins=src.alloc)
        send.publish_layer(0)
        stale = consumer.start_recv(spec("xfer-1", src), dst.region())
        stale.wait_layer(0, time.monotonic() + 10)
        send.close()  # unfinished: entry 0 retires, and with no grace the next send reuses it
        send = producer.start_send(spec("xfer-2", src), src.region(), pins=src.alloc)
        table = producer.control_table(src.pool.handle.name)
        assert table is not None
        assert (table.high_water, table.num_in_use) == (1, 1)
        with pytest.raises(RemoteError) as info:
            stale.wait_layer(1, time.monotonic() + 10)
        assert str(info.value) == ("remote error [stale]: shm transfer xfer-1: control entry 0 was reclaimed "
                                   "(generation 1, now 2); the producer ended it")
        assert stale.poll() == 1
        stale.close()  # writes nothing into the reused entry
        recv = consumer.start_recv(spec("xfer-2", src), dst.region())
        for layer in range(LAYOUT.num_layers):
            send.publish_layer(layer)
        recv.wait(time.monotonic() + 10)
        send.wait(time.monotonic() + 10)
        recv.close()
        send.close()
        assert_received(dst)
        assert (table.high_water, table.num_in_use) == (1, 0)
        src.release_and_check()
        dst.release_and_check()
    finally:
        producer.close()
        consumer.close()


def test_producer_close_fails_the_consumer_fast_and_its_final_word_frees_the_entry(
        sides: tuple[Side, Side]) -> None:
    src, dst = sides
    producer, consumer = ShmTransport(reclaim_grace_s=60.0), ShmTransport()
    try:
        send = producer.start_send(spec("xfer-1", src), src.region(), pins=src.alloc)
        recv = consumer.start_recv(spec("xfer-1", src), dst.region())
        send.publish_layer(0)
        recv.wait_layer(0, time.monotonic() + 10)
        send.close()
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"^remote error \[aborted\]: shm transfer xfer-1: the producer gave up$"):
            recv.wait(time.monotonic() + 10)
        assert time.monotonic() - start < 5
        table = producer.control_table(src.pool.handle.name)
        assert table is not None
        assert table.num_in_use == 1  # retired until the consumer's final word (grace is 60 s)
        recv.close()
        send = producer.start_send(spec("xfer-2", src), src.region())
        assert (table.high_water, table.num_in_use) == (1, 1)  # the retired entry 0 was reused
        send.close()
        src.release_and_check()
        dst.release_and_check()
    finally:
        producer.close()
        consumer.close()


def test_duplicate_transfer_id_in_flight_is_refused(sides: tuple[Side, Side]) -> None:
    src, _ = sides
    producer = ShmTransport()
    try:
        send = producer.start_send(spec("xfer-1", src), src.region())
        with pytest.raises(ValueError, match=r"^transfer_id: a transfer with this id is in flight on pool 'kvb-pool-"):
            producer.start_send(spec("xfer-1", src), src.region())
        send.close()
        producer.start_send(spec("xfer-1", src), src.region()).close()
    finally:
        producer.close()
