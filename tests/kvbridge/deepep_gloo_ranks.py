"""The two ranks' side of test_transport_deepep_gloo.py: scenarios and the rank process.

Each scenario is a pair (rank 0 producer, rank 1 consumer) of functions that run their side on
a fresh ``DeepEPTransport.with_exchange(GlooExchange())`` and return what they observed;
``rank_main`` joins the gloo group and runs the scenarios the test process names.
"""


from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch.distributed as dist
from transport_procs import LAYOUT, eventually, pattern, source_slots

from kvbridge.errors import KVBridgeError
from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import TransferSpec
from kvbridge.transport.deepep import DeepEPTransport, GlooExchange
from kvbridge.transport.deepep_rows import MAX_ROW_BYTES
from kvbridge.transport.regions import PoolRegion

WAIT_S = 10.0  # every wait in a scenario; a hang fails the test instead of blocking it
NUM_LAYERS = LAYOUT.num_layers
Report = tuple[object, ...]


class Blocks:
    """A pool array with its allocator: ``slots`` allocated (source: (1, 2, 5); dest: (0, 1, 2))."""

    def __init__(self, source: bool) -> None:
        self.array = np.zeros((NUM_LAYERS, LAYOUT.num_slots, LAYOUT.block_bytes), dtype=np.uint8)
        self.alloc = SlotAllocator(LAYOUT.num_slots)
        self.slots = source_slots(self.alloc) if source else tuple(self.alloc.allocate(3) or ())

    def region(self, slots: tuple[int, ...] | None = None) -> PoolRegion:
        return PoolRegion(self.array, self.slots if slots is None else slots)

    def fill(self, layer: int) -> None:
        for k, slot in enumerate(self.slots):
            self.array[layer, slot] = pattern(layer, k)

    def layers_ok(self, slots: tuple[int, ...] | None = None) -> list[str]:
        """Per layer: 'ok' (block k holds pattern(layer, k)), 'zero' (untouched) or 'wrong'."""
        got = self.array[:, list(self.slots if slots is None else slots)]
        return ["ok" if all(np.array_equal(got[i, k], pattern(i, k)) for k in range(got.shape[1]))
                else "zero" if not got[i].any() else "wrong" for i in range(NUM_LAYERS)]

    def refs(self, slots: tuple[int, ...] | None = None) -> list[int]:
        self.alloc.check_integrity()
        return [self.alloc.refcount(s) for s in (self.slots if slots is None else slots)]


@contextmanager
def gloo_transport(store: Any, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[DeepEPTransport]:
    transport = DeepEPTransport.with_exchange(GlooExchange(), store=store, max_row_bytes=max_row_bytes)
    try:
        yield transport
    finally:
        transport.close()


def expect(peer: Connection, message: str) -> None:
    if not peer.poll(WAIT_S):
        raise RuntimeError(f"no {message!r} from the peer in {WAIT_S} s")
    if (got := peer.recv()) != message:
        raise RuntimeError(f"expected {message!r} from the peer, got {got!r}")


def deadline() -> float:
    return time.monotonic() + WAIT_S


def error_of(call: Callable[[], None]) -> str:
    try:
        call()
    except KVBridgeError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def consumer_spec(transfer_id: str, num_blocks: int = 3) -> TransferSpec:
    """What the producer's ``spec_for`` gives (rank 0 to rank 1), built on the consumer's side."""
    return TransferSpec(transfer_id, NUM_LAYERS, num_blocks * LAYOUT.block_bytes, endpoint="deepep:0:1")


# --- scenarios: (rank 0 producer, rank 1 consumer), each returns what it observed ---------------

def produce_layerwise(store: Any, peer: Connection) -> Report:
    src = Blocks(source=True)
    with gloo_transport(store) as transport:
        spec = transport.spec_for("layerwise", NUM_LAYERS, 3 * LAYOUT.block_bytes, src.slots)
        send = transport.start_send(spec, src.region(), pins=src.alloc)
        peer.send(spec)
        pinned = src.refs()
        src.fill(0)
        send.publish_layer(0)
        expect(peer, "ack0")  # the consumer has layer 0; the others are not even written yet
        for layer in range(1, NUM_LAYERS):
            src.fill(layer)
            send.publish_layer(layer)
        send.wait(deadline())
        polled = send.poll()
        send.close()
        return pinned, polled, src.refs()


def consume_layerwise(store: Any, peer: Connection) -> Report:
    dst = Blocks(source=False)
    with gloo_transport(store) as transport:
        if not peer.poll(WAIT_S):
            raise RuntimeError("no spec from the producer")
        recv = transport.start_recv(peer.recv(), dst.region())
        recv.wait_layer(0, deadline())
        seen = (recv.poll(), dst.layers_ok())
        peer.send("ack0")
        recv.wait(deadline())
        recv.close()
        return seen, recv.poll(), dst.layers_ok()


def produce_two(store: Any, peer: Connection) -> Report:
    src = Blocks(source=True)
    with gloo_transport(store) as transport:
        sends = [transport.start_send(transport.spec_for(tid, NUM_LAYERS, 3 * LAYOUT.block_bytes, src.slots),
                                      src.region(), pins=src.alloc) for tid in ("first", "second")]
        pinned = src.refs()
        for layer in range(NUM_LAYERS):
            src.fill(layer)
        for send in reversed(sends):  # the second is published first; it still runs after the first
            for layer in range(NUM_LAYERS):
                send.publish_layer(layer)
        for send in sends:
            send.wait(deadline())
            send.close()
        return pinned, [send.poll() for send in sends], src.refs()


def consume_two(store: Any, peer: Connection) -> Report:
    dst = Blocks(source=False)
    other = tuple(dst.alloc.allocate(3) or ())
    with gloo_transport(store) as transport:
        recvs = [transport.start_recv(consumer_spec("first"), dst.region()),
                 transport.start_recv(consumer_spec("second"), dst.region(other))]
        for recv in reversed(recvs):
            recv.wait(deadline())
            recv.close()
        return other, [recv.poll() for recv in recvs], dst.layers_ok(), dst.layers_ok(other)


def produce_after_deadline(store: Any, peer: Connection) -> Report:
    src = Blocks(source=True)
    with gloo_transport(store) as transport:
        spec = transport.spec_for("deadline", NUM_LAYERS, 3 * LAYOUT.block_bytes, src.slots)
        send = transport.start_send(spec, src.region(), pins=src.alloc)
        expect(peer, "gave up")
        start = time.monotonic()
        error = error_of(lambda: send.wait(deadline()))
        ended_by_refusal = time.monotonic() - start < WAIT_S / 2  # not by our own deadline
        polled = send.poll()
        send.close()
        peer.send("done")
        return error, ended_by_refusal, polled, src.refs()


def consume_with_short_deadline(store: Any, peer: Connection) -> Report:
    dst = Blocks(source=False)
    with gloo_transport(store) as transport:
        recv = transport.start_recv(consumer_spec("deadline"), dst.region())
        error = error_of(lambda: recv.wait_layer(0, time.monotonic() + 0.2))
        recv.close()
        peer.send("gave up")
        expect(peer, "done")
        return error, recv.poll(), dst.layers_ok()


def produce_then_close(store: Any, peer: Connection) -> Report:
    src = Blocks(source=True)
    with gloo_transport(store) as transport:
        spec = transport.spec_for("handle-close", NUM_LAYERS, 3 * LAYOUT.block_bytes, src.slots)
        send = transport.start_send(spec, src.region(), pins=src.alloc)
        for layer in (0, 1):
            src.fill(layer)
            send.publish_layer(layer)
        expect(peer, "got1")
        two_done = eventually(lambda: send.poll() == 2)
        send.close()  # mid-transfer: layers 2 and 3 never published
        return two_done, send.poll(), src.refs()


def consume_until_producer_closes(store: Any, peer: Connection) -> Report:
    dst = Blocks(source=False)
    with gloo_transport(store) as transport:
        recv = transport.start_recv(consumer_spec("handle-close"), dst.region())
        recv.wait_layer(1, deadline())
        peer.send("got1")
        return error_of(lambda: recv.wait(deadline())), recv.poll(), dst.layers_ok()


def produce_until_consumer_closes(store: Any, peer: Connection) -> Report:
    src = Blocks(source=True)
    with gloo_transport(store) as transport:
        spec = transport.spec_for("transport-close", NUM_LAYERS, 3 * LAYOUT.block_bytes, src.slots)
        send = transport.start_send(spec, src.region(), pins=src.alloc)
        src.fill(0)
        send.publish_layer(0)
        expect(peer, "closed")
        for layer in range(1, NUM_LAYERS):
            src.fill(layer)
            send.publish_layer(layer)
        error = error_of(lambda: send.wait(deadline()))
        polled = send.poll()
        send.close()
        return error, polled, src.refs()


def consume_then_close_transport(store: Any, peer: Connection) -> Report:
    dst = Blocks(source=False)
    with gloo_transport(store) as transport:
        recv = transport.start_recv(consumer_spec("transport-close"), dst.region())
        recv.wait_layer(0, deadline())
        transport.close()  # mid-transfer, with the receive handle still open
        peer.send("closed")
        return recv.poll(), dst.layers_ok()


def produce_all(transfer_id: str, max_row_bytes: int, store: Any, peer: Connection) -> Report:
    """Publishes every layer at once; reports how the transfer ended."""
    src = Blocks(source=True)
    with gloo_transport(store, max_row_bytes) as transport:
        spec = transport.spec_for(transfer_id, NUM_LAYERS, 3 * LAYOUT.block_bytes, src.slots)
        send = transport.start_send(spec, src.region(), pins=src.alloc)
        for layer in range(NUM_LAYERS):
            src.fill(layer)
            send.publish_layer(layer)
        error = error_of(lambda: send.wait(deadline()))
        send.close()
        return error, send.poll(), src.refs()


def consume_all(transfer_id: str, num_blocks: int, max_row_bytes: int, store: Any, peer: Connection) -> Report:
    dst = Blocks(source=False)
    with gloo_transport(store, max_row_bytes) as transport:
        recv = transport.start_recv(consumer_spec(transfer_id, num_blocks), dst.region(dst.slots[:num_blocks]))
        return error_of(lambda: recv.wait(deadline())), recv.poll(), dst.layers_ok()


Scenario = Callable[[Any, Connection], Report]
SCENARIOS: dict[str, tuple[Scenario, Scenario]] = {
    "layerwise": (produce_layerwise, consume_layerwise),
    "two": (produce_two, consume_two),
    "deadline": (produce_after_deadline, consume_with_short_deadline),
    "handle-close": (produce_then_close, consume_until_producer_closes),
    "transport-close": (produce_until_consumer_closes, consume_then_close_transport),
    # 12288-byte layers in rows of <= 4096 bytes: 3 rows, where the consumer's 8192 expect 2
    "row-count": (partial(produce_all, "row-count", 4096), partial(consume_all, "row-count", 2, 4096)),
    # the same layer in rows of <= 4096 and <= 8160 bytes: 3 rows of 4096 against 2 of 6144
    "row-width": (partial(produce_all, "row-width", 4096), partial(consume_all, "row-width", 3, MAX_ROW_BYTES)),
}


def rank_main(rank: int, port: int, ctl: Connection, peer: Connection) -> None:
    """One rank: joins the gloo group, then runs its side of each scenario the test names."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=WAIT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=WAIT_S))
    try:
        while (name := ctl.recv()) is not None:
            try:
                report = SCENARIOS[name][rank](store, peer)
            except BaseException:
                report = ("failed", traceback.format_exc())
            ctl.send(report)
    finally:
        dist.destroy_process_group()
