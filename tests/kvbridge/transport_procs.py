"""Producer process body and payload pattern shared by the transport tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

import numpy as np

from kvbridge.pool import HostBlockPool, PoolLayout
from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import TransferSpec, Transport
from kvbridge.transport.regions import PoolRegion
from kvbridge.transport.registry import get_transport

LAYOUT = PoolLayout(num_layers=4, num_slots=8, block_bytes=4096)


def pattern(layer: int, block: int) -> np.ndarray:
    return np.random.default_rng(layer * 100 + block).integers(0, 256, LAYOUT.block_bytes, dtype=np.uint8)


def fill_pattern(pool: HostBlockPool, layer: int, slots: Sequence[int]) -> None:
    """Writes block k of ``slots`` in ``layer`` with ``pattern(layer, k)``."""
    for k, slot in enumerate(slots):
        pool.block(layer, slot)[:] = pattern(layer, k)


def assert_pattern(pool: HostBlockPool, slots: Sequence[int]) -> None:
    """Every layer's block k of ``slots`` holds exactly ``pattern(layer, k)``."""
    for layer in range(LAYOUT.num_layers):
        for k, slot in enumerate(slots):
            np.testing.assert_array_equal(pool.block(layer, slot), pattern(layer, k))


def source_slots(alloc: SlotAllocator) -> tuple[int, ...]:
    """Slots (1, 2, 5): two runs, so both transports exercise a strided layer."""
    slots = alloc.allocate(6)
    assert slots == [0, 1, 2, 3, 4, 5]
    alloc.free([0, 3, 4])
    return (1, 2, 5)


class Side:
    """A pool with its allocator; ``slots`` allocated (source: (1, 2, 5); dest: [0, 1, 2])."""

    def __init__(self, source: bool) -> None:
        self.pool = HostBlockPool.create(LAYOUT)
        self.alloc = SlotAllocator(LAYOUT.num_slots)
        self.slots = source_slots(self.alloc) if source else tuple(self.alloc.allocate(3) or ())
        if source:
            for layer in range(LAYOUT.num_layers):
                fill_pattern(self.pool, layer, self.slots)

    def region(self) -> PoolRegion:
        return PoolRegion(self.pool.array, self.slots)

    def release_and_check(self) -> None:
        """No leak: only our own reference is left on each slot, and freeing empties the pool."""
        self.alloc.check_integrity()
        assert [self.alloc.refcount(s) for s in self.slots] == [1, 1, 1]
        self.alloc.free(self.slots)
        self.alloc.check_integrity()
        assert self.alloc.num_free == LAYOUT.num_slots


def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Polls ``predicate`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def make_spec(transport: Transport, name: str, pool: HostBlockPool, slots: tuple[int, ...]) -> TransferSpec:
    layer_nbytes = len(slots) * LAYOUT.block_bytes
    if name == "tcp":
        return transport.spec_for("xfer-1", LAYOUT.num_layers, layer_nbytes, slots)  # type: ignore[attr-defined]
    return TransferSpec("xfer-1", LAYOUT.num_layers, layer_nbytes, pool=pool.handle, source_slots=slots)


def producer(name: str, conn: Connection) -> None:
    """Writes and publishes layer 0, waits for the consumer's ack of layer 0, then the rest."""
    transport = get_transport(name)()
    pool = HostBlockPool.create(LAYOUT)
    alloc = SlotAllocator(LAYOUT.num_slots)
    slots = source_slots(alloc)
    spec = make_spec(transport, name, pool, slots)
    send = transport.start_send(spec, PoolRegion(pool.array, slots), pins=alloc)
    conn.send(spec)
    for layer in range(LAYOUT.num_layers):
        if layer == LAYOUT.num_layers - 1 and (not conn.poll(30) or conn.recv() != "ack0"):
            raise RuntimeError("no ack of layer 0")
        fill_pattern(pool, layer, slots)
        send.publish_layer(layer)
    send.wait(time.monotonic() + 30)
    send.close()
    alloc.check_integrity()
    refs = [alloc.refcount(s) for s in slots]
    alloc.free(slots)
    conn.send((refs, alloc.num_free))
    conn.recv()  # the consumer is done with our pool
    transport.close()
    pool.close()
