"""The deepep transport: its pure parts exactly on CPU (a KV layer as tagged bf16 rows and back,
routing, row sizes, endpoints, the store handshake on real torch.distributed stores, the
construction errors), and a two-GPU exchange that runs only where deep_ep and two CUDA devices
are present (it skips, saying so, everywhere else)."""

from __future__ import annotations

import random
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from kvbridge.errors import ProtocolError, TransportUnavailable
from kvbridge.transport.base import TransferSpec
from kvbridge.transport.deepep import DeepEPTransport, deepep_available, missing_requirement
from kvbridge.transport.deepep_gate import ACCEPT, OFFER, REFUSED, WITHDRAWN, LayerGate
from kvbridge.transport.deepep_rows import (
    MAX_ROW_BYTES,
    RowLayout,
    format_endpoint,
    pack_layer,
    parse_endpoint,
    read_tags,
    routing,
    transfer_key,
    unpack_rows,
)
from kvbridge.transport.regions import ArrayLayers, PoolRegion
from kvbridge.transport.registry import get_transport


def layer_bytes(dtype: str, nbytes: int, seed: int) -> np.ndarray:
    """``nbytes`` random bytes seen through ``dtype`` (any bit pattern: NaN payloads included)."""
    raw = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    if dtype == "bfloat16":
        return torch.from_numpy(raw.copy()).view(torch.bfloat16).view(torch.uint8).numpy()
    return raw.view(np.dtype(dtype)).view(np.uint8)


def split(buf: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return [buf[a:b] for a, b in zip([0, *cuts], [*cuts, buf.nbytes], strict=True)]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "uint8"])
def test_rows_round_trip_bit_exact_across_splits_and_permutation(dtype: str) -> None:
    nbytes = 10_000  # 3 rows of 3344 bytes: the last one holds 3312 and 32 bytes of padding
    layout = RowLayout.for_layer(nbytes, 4096)
    assert (layout.num_rows, layout.row_bytes, layout.hidden) == (3, 3344, 1680)
    src = layer_bytes(dtype, nbytes, seed=7)
    key = transfer_key("xfer-1")
    rows = pack_layer(split(src, [1000, 6500]), layout, layer=2, key=key)
    assert rows.dtype == torch.bfloat16 and tuple(rows.shape) == (3, 1680)
    arrived = rows[torch.tensor([2, 0, 1])].clone()  # DeepEP may deliver rows in any order
    index = read_tags(arrived, layout, layer=2, key=key)
    assert index.tolist() == [2, 0, 1]
    dst = np.zeros(nbytes, dtype=np.uint8)
    unpack_rows(arrived, index, split(dst, [3344, 9999]), nbytes)
    assert dst.tobytes() == src.tobytes()


def test_row_layout_sizes_and_errors() -> None:
    sizes = {n: (RowLayout.for_layer(n).num_rows, RowLayout.for_layer(n).row_bytes)
             for n in (1, 16, 17, MAX_ROW_BYTES, MAX_ROW_BYTES + 1, 3 * MAX_ROW_BYTES)}
    assert sizes == {1: (1, 16), 16: (1, 16), 17: (1, 32), 8160: (1, 8160), 8161: (2, 4096), 24480: (3, 8160)}
    assert RowLayout.for_layer(4096 * 3 + 1, 4096) == RowLayout(12289, 3088)
    with pytest.raises(ValueError, match=r"^max_row_bytes: expected a multiple of 16 in \[16, 8160\], got 100$"):
        RowLayout.for_layer(1000, 100)
    with pytest.raises(ValueError, match=r"^max_row_bytes: expected a multiple of 16 in \[16, 8160\], got 8176$"):
        RowLayout.for_layer(1000, 8176)
    with pytest.raises(ValueError, match=r"^layer_nbytes: expected >= 1, got 0$"):
        RowLayout.for_layer(0)
    with pytest.raises(ValueError, match=r"^row_bytes: expected a multiple of 16 in \[16, 8160\], got 24$"):
        RowLayout(100, 24)


def test_pack_layer_writes_data_padding_and_tags_exactly() -> None:
    layout = RowLayout(40, 16)
    src = np.arange(40, dtype=np.uint8)
    raw = pack_layer([src], layout, layer=5, key=0xABCDEF01).view(torch.uint8).numpy()
    word = ((0xABCDEF01 << 32) | 5).to_bytes(8, "little")
    expected = [bytes(range(0, 16)), bytes(range(16, 32)), bytes(range(32, 40)) + bytes(8)]
    assert [raw[k].tobytes() for k in range(3)] == [data + k.to_bytes(8, "little") + word
                                                    for k, data in enumerate(expected)]


def test_read_tags_refuses_foreign_or_broken_rows() -> None:
    layout = RowLayout(40, 16)
    rows = pack_layer([np.zeros(40, dtype=np.uint8)], layout, layer=1, key=9)
    with pytest.raises(ProtocolError, match=r"^deepep rows: row 0 is of transfer key 9 layer 1, expected key 9 layer 2$"):
        read_tags(rows, layout, layer=2, key=9)
    with pytest.raises(ProtocolError, match=r"^deepep rows: row 0 is of transfer key 9 layer 1, expected key 8 layer 1$"):
        read_tags(rows, layout, layer=1, key=8)
    with pytest.raises(ProtocolError, match=r"^deepep rows: got 0 rows of 32 bytes, expected 3 of 32 for layer 1$"):
        read_tags(rows[:0], layout, layer=1, key=9)
    with pytest.raises(ProtocolError, match=r"^deepep rows: row indices of layer 1 are not a permutation of 0..2$"):
        read_tags(rows[torch.tensor([0, 1, 1])], layout, layer=1, key=9)


def test_unpack_and_pack_argument_errors_leave_the_destination_untouched() -> None:
    layout = RowLayout(40, 16)
    rows = pack_layer([np.full(40, 7, dtype=np.uint8)], layout)
    dst = np.zeros(40, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"^dest_runs: 39 bytes, layer_nbytes is 40$"):
        unpack_rows(rows, [0, 1, 2], [dst[:39]], 40)
    with pytest.raises(ValueError, match=r"^src_index: expected a permutation of 0..2, got \[0, 0, 2\]$"):
        unpack_rows(rows, [0, 0, 2], [dst], 40)
    with pytest.raises(ValueError, match=r"^rows/src_index: 2 rows and 2 indices, a 40-byte layer of 16-byte rows has 3$"):
        unpack_rows(rows[:2], [0, 1], [dst], 40)
    with pytest.raises(ValueError, match=r"^dest_runs\[0\]: expected a contiguous 1-D uint8 array, got uint8 \(20,\)$"):
        unpack_rows(rows, [0, 1, 2], [dst[::2], dst[:20]], 40)
    with pytest.raises(ValueError, match=r"^rows: expected a CPU \[n, hidden\] bf16 tensor, got torch.float32 \(3, 16\) on cpu$"):
        unpack_rows(torch.zeros(3, 16), [0, 1, 2], [dst], 40)
    assert not dst.any()
    with pytest.raises(ValueError, match=r"^runs: 41 bytes, layout says 40$"):
        pack_layer([np.zeros(41, dtype=np.uint8)], layout)
    with pytest.raises(ValueError, match=r"^runs\[0\]: expected a contiguous 1-D uint8 array, got float32 \(10,\)$"):
        pack_layer([np.zeros(10, dtype=np.float32)], layout)


def test_routing_one_expert_per_rank() -> None:
    idx, weights = routing(3, 1, 2)
    assert (idx.dtype, weights.dtype) == (torch.int64, torch.float32)
    assert (idx.tolist(), weights.tolist()) == ([[1], [1], [1]], [[1.0], [1.0], [1.0]])
    idx, weights = routing(1, None, 2)
    assert (idx.tolist(), weights.tolist()) == ([[-1]], [[0.0]])
    with pytest.raises(ValueError, match=r"^dest_rank: expected a rank in \[0, 2\), got 2$"):
        routing(3, 2, 2)
    with pytest.raises(ValueError, match=r"^num_rows: expected >= 1, got 0$"):
        routing(0, 1, 2)
    with pytest.raises(ValueError, match=r"^world_size: expected >= 2, got 1$"):
        routing(1, 0, 1)


def test_endpoints() -> None:
    assert format_endpoint(0, 1) == "deepep:0:1"
    assert parse_endpoint("deepep:1:0", 2) == (1, 0)
    for bad, why in [("deepep:1", "expected 'deepep:<producer rank>:<consumer rank>'"),
                     ("tcp:0:1", "expected 'deepep:<producer rank>:<consumer rank>'"),
                     ("deepep:0:-1", "expected 'deepep:<producer rank>:<consumer rank>'"),
                     ("deepep:1:1", r"expected two distinct ranks in \[0, 2\)"),
                     ("deepep:0:2", r"expected two distinct ranks in \[0, 2\)")]:
        with pytest.raises(ValueError, match=rf"^endpoint: {why}, got '{bad}'$"):
            parse_endpoint(bad, 2)


@pytest.fixture(params=["hash", "tcp"])
def stores(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """Two handles on one real store (the producer's and the consumer's)."""
    if request.param == "hash":
        store = dist.HashStore()
        return store, store
    server = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, 2, False)
    return server, client


def gone(store: Any, gate: LayerGate, layer: int = 0) -> bool:
    return not store.check([gate.key(layer)])


def test_gate_sequences(stores: tuple[Any, Any]) -> None:
    ps, cs = stores
    for n, tid in enumerate(["ok", "refused-early", "refused-late", "withdrawn-early", "withdrawn-late",
                             "withdraw-after-accept", "both-give-up"]):
        prod, cons = LayerGate(ps, tid), LayerGate(cs, tid)
        if n == 0:
            assert (cons.accept(0), prod.offer(0), prod.answer(0), cons.accept(0), prod.answer(0)) == \
                (None, OFFER, OFFER, ACCEPT, ACCEPT)
        elif n == 1:
            assert (prod.refused_early(0), cons.refuse(0), prod.refused_early(0), prod.offer(0)) == \
                (False, REFUSED, True, REFUSED)
        elif n == 2:
            assert (prod.offer(0), cons.refuse(0), prod.answer(0)) == (OFFER, REFUSED, REFUSED)
        elif n == 3:
            assert (prod.withdraw(0), cons.accept(0)) == (WITHDRAWN, WITHDRAWN)
        elif n == 4:
            assert (prod.offer(0), prod.withdraw(0), cons.accept(0)) == (OFFER, WITHDRAWN, WITHDRAWN)
        elif n == 5:
            assert (prod.offer(0), cons.accept(0), prod.withdraw(0)) == (OFFER, ACCEPT, ACCEPT)
        else:
            assert (prod.offer(0), prod.withdraw(0), cons.refuse(0)) == (OFFER, WITHDRAWN, WITHDRAWN)
        assert gone(ps, prod), tid
    with pytest.raises(ValueError, match="^transfer_id: the deepep gate needs a non-empty transfer id$"):
        LayerGate(ps, "")


def pending_to_none(answer: bytes) -> bytes | None:
    return None if answer == OFFER else answer


def poll(step: Any) -> bytes:
    while (got := step()) is None:
        time.sleep(random.random() * 1e-4)
    return bytes(got)


def race_producer(prod: LayerGate, quits: bool, delay: float, entered: dict[str, bool]) -> None:
    time.sleep(delay)
    got = prod.offer(0)
    if got == OFFER:
        got = prod.withdraw(0) if quits else poll(lambda: pending_to_none(prod.answer(0)))
    entered["producer"] = got == ACCEPT


def race_consumer(cons: LayerGate, quits: bool, delay: float, entered: dict[str, bool]) -> None:
    time.sleep(delay)
    got = cons.refuse(0) if quits else poll(lambda: cons.accept(0))
    entered["consumer"] = got == ACCEPT


def test_gate_both_sides_always_agree_under_races(stores: tuple[Any, Any]) -> None:
    """Randomized: producer and consumer race offers, accepts and give-ups on one layer; the
    oracle: they enter the dispatch together or not at all (both when neither gives up, neither
    when the consumer refuses), and no key is left behind."""
    ps, cs = stores
    rng = random.Random(3)
    outcomes = set()
    for trial in range(60):
        prod, cons = LayerGate(ps, f"t{trial}"), LayerGate(cs, f"t{trial}")
        p_quits, c_quits = rng.random() < 0.4, rng.random() < 0.4
        entered: dict[str, bool] = {}
        threads = [threading.Thread(target=race_producer, args=(prod, p_quits, rng.random() * 2e-3, entered)),
                   threading.Thread(target=race_consumer, args=(cons, c_quits, rng.random() * 2e-3, entered))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert entered["producer"] == entered["consumer"], (trial, p_quits, c_quits)
        if not p_quits and not c_quits:
            assert entered["producer"], trial
        if c_quits:
            assert not entered["producer"], trial
        assert gone(ps, prod), trial
        outcomes.add((p_quits, c_quits))
    assert outcomes == {(False, False), (False, True), (True, False), (True, True)}


def test_missing_requirement_messages() -> None:
    every = {"deep_ep_found": True, "cuda_available": True, "group_given": False, "dist_initialized": True}
    assert missing_requirement(**every) is None
    assert missing_requirement(**{**every, "dist_initialized": False, "group_given": True}) is None
    assert missing_requirement(**{**every, "deep_ep_found": False, "cuda_available": False}) == (
        "transport 'deepep' needs the 'deep_ep' package (DeepEP, built against NVSHMEM), not installed")
    assert missing_requirement(**{**every, "cuda_available": False, "dist_initialized": False}) == (
        "transport 'deepep' needs CUDA (DeepEP runs on NVIDIA GPUs); torch.cuda.is_available() is False")
    assert missing_requirement(**{**every, "dist_initialized": False}) == (
        "transport 'deepep' needs a torch.distributed process group: pass group=, "
        "or call torch.distributed.init_process_group() first")


def test_deepep_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules marks deep_ep unimportable, whether or not it is installed
    monkeypatch.setitem(sys.modules, "deep_ep", None)
    assert not deepep_available()
    assert get_transport("deepep") is DeepEPTransport
    with pytest.raises(TransportUnavailable, match=r"^transport 'deepep' needs the 'deep_ep' package "
                                                   r"\(DeepEP, built against NVSHMEM\), not installed$"):
        DeepEPTransport()
    with pytest.raises(ValueError, match=r"^max_row_bytes: expected a multiple of 16 in \[16, 8160\], got 8$"):
        DeepEPTransport(max_row_bytes=8)


# --- two GPUs: skipped unless deep_ep and two CUDA devices are present --------------------------

NUM_LAYERS, BLOCK_BYTES = 4, 4004  # a layer of 3 blocks: 12012 bytes, 2 rows of 6016 (20 padding)


def reference(layer: int) -> np.ndarray:
    return np.random.default_rng(layer).integers(0, 256, 3 * BLOCK_BYTES, dtype=np.uint8)


def _gpu_rank(rank: int, port: int, tmp: str) -> None:
    """One rank of the two-GPU exchange: rank 0 produces, rank 1 consumes into other blocks."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    transport = DeepEPTransport()
    ack, deadline = Path(tmp) / "ack0", time.monotonic() + 120
    try:
        spec = TransferSpec("xfer-1", NUM_LAYERS, 3 * BLOCK_BYTES, endpoint=format_endpoint(0, 1))
        if rank == 0:
            src = [np.zeros(3 * BLOCK_BYTES, dtype=np.uint8) for _ in range(NUM_LAYERS)]
            send = transport.start_send(spec, ArrayLayers(src))
            for layer in range(NUM_LAYERS):
                while layer == NUM_LAYERS - 1 and not ack.exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError("the consumer never saw layer 0")
                    time.sleep(0.01)
                src[layer][:] = reference(layer)
                send.publish_layer(layer)
            send.wait(deadline)
            assert send.poll() == NUM_LAYERS
            send.close()
        else:
            pool = np.zeros((NUM_LAYERS, 4, BLOCK_BYTES), dtype=np.uint8)
            recv = transport.start_recv(spec, PoolRegion(pool, (3, 0, 2)))
            recv.wait_layer(0, deadline)
            assert pool[0, [3, 0, 2]].tobytes() == reference(0).tobytes()
            ack.touch()  # the producer writes the last layer only now
            recv.wait(deadline)
            assert [pool[i, [3, 0, 2]].tobytes() for i in range(NUM_LAYERS)] == \
                [reference(i).tobytes() for i in range(NUM_LAYERS)]
            assert recv.poll() == NUM_LAYERS
            recv.close()
            store = dist.distributed_c10d._get_default_store()
            assert not any(store.check([LayerGate(store, "xfer-1").key(i)]) for i in range(NUM_LAYERS))
    finally:
        transport.close()
        dist.destroy_process_group()


@pytest.mark.skipif(not deepep_available() or torch.cuda.device_count() < 2,
                    reason="needs the deep_ep package (DeepEP, NVSHMEM) and two CUDA GPUs")
def test_two_gpu_layerwise_exchange(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.start_processes(_gpu_rank, args=(port, str(tmp_path)), nprocs=2,
                                                join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two-GPU deepep exchange did not finish in 300 s")
