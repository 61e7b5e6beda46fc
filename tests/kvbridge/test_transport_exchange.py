"""Two OS processes exchange a multi-layer KV payload over shm and tcp: bytes identical,
layer 0 seen before the producer writes the last layer, no slot leaked on either side."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
from transport_procs import LAYOUT, assert_pattern, pattern, producer

from kvbridge.pool import HostBlockPool
from kvbridge.slots import SlotAllocator
from kvbridge.transport.regions import PoolRegion
from kvbridge.transport.registry import get_transport


@pytest.mark.parametrize("name", ["shm", "tcp"])
def test_two_process_layerwise_exchange(name: str) -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=producer, args=(name, child), daemon=True)
    proc.start()
    transport = get_transport(name)()
    dest = HostBlockPool.create(LAYOUT)
    alloc = SlotAllocator(LAYOUT.num_slots)
    try:
        dest_slots = alloc.allocate(4)
        assert dest_slots == [0, 1, 2, 3]
        alloc.free([1])
        slots = (3, 0, 2)  # a different order and split than the source
        assert parent.poll(60)
        spec = parent.recv()
        recv = transport.start_recv(spec, PoolRegion(dest.array, slots))
        recv.wait_layer(0, time.monotonic() + 30)
        # the producer is blocked on our ack before it writes the last layer
        assert recv.poll() in (1, 2, 3)
        assert all((dest.block(0, s) == pattern(0, k)).all() for k, s in enumerate(slots))
        assert not dest.array[3].any()
        parent.send("ack0")
        recv.wait(time.monotonic() + 30)
        assert recv.poll() == 4
        recv.close()
        assert_pattern(dest, slots)
        assert parent.poll(30)
        assert parent.recv() == ([1, 1, 1], 8)  # producer: pins released, then its own slots freed
        parent.send("bye")
        proc.join(30)
        assert proc.exitcode == 0
        alloc.free(slots)
        alloc.check_integrity()
        assert alloc.num_free == LAYOUT.num_slots
    finally:
        transport.close()
        dest.close()
        if proc.is_alive():
            proc.kill()
