"""The deepep transport between two real processes on CPU: everything but the DeepEP dispatch.

``DeepEPTransport.with_exchange(GlooExchange())`` runs the real handles, worker thread, store
handshake (a TCPStore served by the test process), deadlines, close and pins; each layer's rows
cross between the processes through real gloo collectives (all_gather + all_to_all_single). The
DeepEP dispatch itself runs only in test_transport_deepep.py's two-GPU test.

Two spawned ranks live for the module (rank 0 produces, rank 1 consumes); each test names a
scenario, both ranks run their side of it on a fresh transport, and report what they observed;
the test process compares the reports exactly and checks that no handshake key is left.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest
import torch.distributed as dist
from transport_procs import LAYOUT, eventually, pattern, source_slots

from kvbridge.errors import KVBridgeError
from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import TransferSpec
from kvbridge.transport.deepep import DeepEPTransport, GlooExchange
from kvbridge.transport.deepep_gate import LayerGate
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


# --- the test process: the store server, two ranks, one test per scenario -----------------------

class Ranks:
    def __init__(self, store: Any, ctls: list[Connection]) -> None:
        self.store = store
        self.ctls = ctls

    def run(self, name: str, transfer_ids: tuple[str, ...] = ()) -> tuple[Report, Report]:
        """Both ranks' reports of scenario ``name``; fails on an error or a hang; checks that no
        handshake key of ``transfer_ids`` (default: ``name``) is left in the store."""
        for ctl in self.ctls:
            ctl.send(name)
        reports = []
        for rank, ctl in enumerate(self.ctls):
            if not ctl.poll(3 * WAIT_S):
                pytest.fail(f"rank {rank} did not finish scenario {name!r} in {3 * WAIT_S} s")
            reports.append(ctl.recv())
        for rank, report in enumerate(reports):
            if report[0] == "failed":
                pytest.fail(f"rank {rank} failed in scenario {name!r}:\n{report[1]}")
        for tid in transfer_ids or (name,):
            gate = LayerGate(self.store, tid)
            assert [self.store.check([gate.key(i)]) for i in range(NUM_LAYERS)] == [False] * NUM_LAYERS, tid
        return reports[0], reports[1]


@pytest.fixture(scope="module")
def ranks() -> Iterator[Ranks]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=WAIT_S))
    ctx = mp.get_context("spawn")
    peers = ctx.Pipe()
    ctls = [ctx.Pipe() for _ in range(2)]
    procs = [ctx.Process(target=rank_main, args=(rank, store.port, ctls[rank][1], peers[rank]), daemon=True)
             for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        yield Ranks(store, [ctl for ctl, _ in ctls])
    finally:
        for ctl, _ in ctls:
            ctl.send(None)
        for proc in procs:
            proc.join(WAIT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()


ALL_OK, NOTHING = ["ok"] * NUM_LAYERS, ["zero"] * NUM_LAYERS


@pytest.mark.timeout(60)  # the first test also starts the two ranks
def test_layerwise_transfer_bytes_identical_and_layer_zero_seen_first(ranks: Ranks) -> None:
    producer, consumer = ranks.run("layerwise")
    assert producer == ([2, 2, 2], NUM_LAYERS, [1, 1, 1])  # pinned while live, released by close
    assert consumer == ((1, ["ok", "zero", "zero", "zero"]), NUM_LAYERS, ALL_OK)


@pytest.mark.timeout(40)
def test_two_transfers_started_in_the_same_order_both_complete(ranks: Ranks) -> None:
    producer, consumer = ranks.run("two", ("first", "second"))
    assert producer == ([3, 3, 3], [NUM_LAYERS, NUM_LAYERS], [1, 1, 1])
    assert consumer == ((3, 4, 5), [NUM_LAYERS, NUM_LAYERS], ALL_OK, ALL_OK)


@pytest.mark.timeout(40)
def test_consumer_deadline_then_producer_fails_fast_without_pins_or_keys(ranks: Ranks) -> None:
    producer, consumer = ranks.run("deadline")
    assert producer == ("RemoteError: remote error [aborted]: deepep transfer deadline: "
                        "the consumer gave up at layer 0", True, 0, [1, 1, 1])
    error, polled, layers = consumer
    assert re.fullmatch(r"TransferTimeout: deepep recv deadline timed out after 0\.\d{3}s; pending: layers \[0\]",
                        str(error)), error
    assert (polled, layers) == (0, NOTHING)


@pytest.mark.timeout(40)
def test_producer_closing_its_handle_mid_transfer_aborts_the_consumer(ranks: Ranks) -> None:
    producer, consumer = ranks.run("handle-close")
    assert producer == (True, 2, [1, 1, 1])
    assert consumer == ("RemoteError: remote error [aborted]: deepep transfer handle-close: "
                        "the producer gave up at layer 2", 2, ["ok", "ok", "zero", "zero"])


@pytest.mark.timeout(40)
def test_consumer_closing_its_transport_mid_transfer_aborts_the_producer(ranks: Ranks) -> None:
    producer, consumer = ranks.run("transport-close")
    assert producer == ("RemoteError: remote error [aborted]: deepep transfer transport-close: "
                        "the consumer gave up at layer 1", 1, [1, 1, 1])
    assert consumer == (1, ["ok", "zero", "zero", "zero"])


@pytest.mark.timeout(40)
def test_rows_only_the_consumer_refuses_stop_the_producer_at_the_next_layer(ranks: Ranks) -> None:
    producer, consumer = ranks.run("row-count")
    assert producer == ("RemoteError: remote error [aborted]: deepep transfer row-count: "
                        "the consumer gave up at layer 1", 1, [1, 1, 1])
    assert consumer == ("ProtocolError: deepep rows: got 3 rows of 4112 bytes, expected 2 of 4112 for layer 0",
                        0, NOTHING)


@pytest.mark.timeout(40)
def test_ranks_disagreeing_on_row_width_both_fail_in_step(ranks: Ranks) -> None:
    producer, consumer = ranks.run("row-width")
    error = ("ProtocolError: deepep exchange: ranks passed rows of [4112, 6160] bytes; "
             "every rank must pass the same width")
    assert producer == (error, 0, [1, 1, 1])
    assert consumer == (error, 0, NOTHING)


def test_cpu_seam_needs_an_initialised_gloo_group() -> None:
    if dist.is_initialized():
        pytest.skip("this test process has a default process group (the ranks here run in their own)")
    with pytest.raises(ValueError, match=r"^group: GlooExchange needs an initialised torch.distributed process group$"):
        GlooExchange()
    with pytest.raises(ValueError, match=r"^group: deepep needs a torch.distributed process group: pass group=, "
                                         r"or call torch.distributed.init_process_group\(\) first$"):
        DeepEPTransport.with_exchange(GlooExchange.__new__(GlooExchange))
    with pytest.raises(ValueError, match=r"^max_row_bytes: expected a multiple of 16 in \[16, 8160\], got 8$"):
        DeepEPTransport.with_exchange(GlooExchange.__new__(GlooExchange), max_row_bytes=8)
