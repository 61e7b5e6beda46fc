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
from collections.abc import Iterator
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch.distributed as dist
from deepep_gloo_ranks import NUM_LAYERS, WAIT_S, Report, rank_main

from kvbridge.transport.deepep import DeepEPTransport, GlooExchange
from kvbridge.transport.deepep_gate import LayerGate

# --- the test process: the store server, two ranks, one test per scenario (their side: deepep_gloo_ranks.py)

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
