"""The disaggregated KV path without Triton: two engines, two kvbridge nodes, real transports.

A prefill engine publishes its KV into its node's shared-memory pool; a decode engine pulls it
by handle (shm on this host, or tcp) and continues token for token. Faults (bad handle, dead
or silent block server) degrade to recompute or a ValueError naming the field; nothing leaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
from collections.abc import Iterator

import pytest
from queue_sink import QueueSink

from backends.engine.engine import LLMEngine
from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from backends.serving.engine_spec import EngineSpec
from backends.serving.kv import NodeTransfer, build_worker
from backends.serving.worker import WorkerService
from backends.serving.worker_io import WorkerJob, merge_updates
from kvbridge import KVNode, KVNodeConfig, pull
from kvbridge.handle import KVHandle

TOK = byte_level_tokenizer()
SPEC = EngineSpec(source="tiny-llama", num_blocks=64, max_model_len=256, max_num_seqs=8)
PROMPT = TOK.encode("The quick brown fox jumps over the lazy dog, twice")  # 50 tokens: 3 full + 1 partial
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
BYTES_PER_TOKEN = 4 * 128 * 4  # num_layers * kv_width * float32


Worker = tuple[LLMEngine, NodeTransfer]


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, Worker]]:
    prefill = build_worker(SPEC, "prefill")
    decode = build_worker(SPEC, "decode")
    yield prefill, decode
    prefill[1].close()
    decode[1].close()


@pytest.fixture(scope="module")
def expected() -> list[int]:
    engine = LLMEngine("tiny-llama", build_engine_config())
    [result] = engine.generate([PROMPT], GREEDY)
    return list(result.output_token_ids)


def build_engine_config():  # type: ignore[no-untyped-def]
    from backends.engine.engine_config import EngineConfig

    return EngineConfig(block_size=16, num_blocks=64, max_model_len=256)


def run(engine: LLMEngine) -> list:
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def prefill_publish(worker: Worker, rid: str, prompt: list[int]) -> tuple[int, bytes, int, int]:
    """(first token, handle bytes, num_bytes, num_cached_tokens) of a prefill-only run."""
    engine, transfer = worker
    engine.add_request(rid, prompt, GREEDY, prefill_only=True)
    [out] = run(engine)
    assert (out.finished, out.finish_reason) == (True, None)
    published = transfer.publish(engine.export_kv(rid), prompt)
    engine.release_kv(rid)
    return out.new_token_ids[0], published.handle, published.num_bytes, out.num_cached_tokens


def decode(worker: Worker, rid: str, prompt: list[int], first: int, handle: bytes) -> list[int]:
    engine, transfer = worker
    engine.add_request(rid, prompt, GREEDY, kv_source=transfer.source(handle), prior_output_ids=[first])
    return [first] + [t for out in run(engine) for t in out.new_token_ids]


def assert_no_leak(*workers: Worker) -> None:
    for engine, transfer in workers:
        transfer.maintain()
        transfer.node.check_integrity()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
        assert len(transfer.node.leases) == 0


def test_prefill_to_decode_over_shm_equals_one_engine(workers: tuple[Worker, Worker], expected: list[int]) -> None:
    prefill, dec = workers
    first, handle, num_bytes, _ = prefill_publish(prefill, "shm-1", PROMPT)
    parsed = KVHandle.from_bytes(handle)
    assert (parsed.num_tokens, len(parsed.block_slots), len(parsed.block_hashes)) == (50, 4, 3)
    assert num_bytes == 50 * BYTES_PER_TOKEN
    assert decode(dec, "shm-1", PROMPT, first, handle) == expected
    assert_no_leak(prefill, dec)


def test_prefill_to_decode_over_tcp_equals_one_engine(
        workers: tuple[Worker, Worker], expected: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    prefill, dec = workers
    monkeypatch.setattr(pull, "shm_reachable", lambda handle: False)
    first, handle, _, _ = prefill_publish(prefill, "tcp-1", PROMPT)
    engine, transfer = dec
    source = transfer.source(handle)
    engine.add_request("tcp-1", PROMPT, GREEDY, kv_source=source, prior_output_ids=[first])
    tokens = [first] + [t for out in run(engine) for t in out.new_token_ids]
    assert (tokens, source.inner.transport_name) == (expected, "tcp")
    assert source.elapsed_ns > 0
    assert_no_leak(prefill, dec)


def test_repeated_prompt_reuses_prefix_and_still_hands_off(
        workers: tuple[Worker, Worker], expected: list[int]) -> None:
    prefill, dec = workers
    prefill_publish(prefill, "warm", PROMPT)
    first, handle, _, cached = prefill_publish(prefill, "hit", PROMPT)
    assert cached == 48  # the 3 full blocks came from the node's store
    assert decode(dec, "hit", PROMPT, first, handle) == expected
    prefill[1].discard("warm")  # never pulled: the consumer is gone
    assert_no_leak(prefill, dec)


def test_layout_mismatch_is_value_error_naming_the_field(workers: tuple[Worker, Worker]) -> None:
    prefill, dec = workers
    _, handle, _, _ = prefill_publish(prefill, "mismatch", PROMPT)
    parsed = KVHandle.from_bytes(handle)
    bad = dataclasses.replace(parsed, layout=dataclasses.replace(parsed.layout, num_layers=5)).to_bytes()
    with pytest.raises(ValueError, match=r"^context_phase_params: KV layout mismatch in layout\.num_layers: "
                                         r"handle has 5, expected 4$"):
        dec[1].source(bad)
    with pytest.raises(ValueError, match=r"^context_phase_params: data: undecodable KV handle"):
        dec[1].source(b"\xc1garbage")
    prefill[1].discard("mismatch")
    assert_no_leak(prefill, dec)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dead_or_silent_source_falls_back_to_recompute(
        workers: tuple[Worker, Worker], expected: list[int]) -> None:
    prefill, dec = workers
    first, handle, _, _ = prefill_publish(prefill, "dead", PROMPT)
    parsed = KVHandle.from_bytes(handle)
    dead = dataclasses.replace(parsed, source_endpoint=f"127.0.0.1:{_closed_port()}", pool_name="")
    assert decode(dec, "dead", PROMPT, first, dead.to_bytes()) == expected
    quick = KVNode(KVNodeConfig("quick", "tiny-llama", 8, 4, pull_timeout_s=0.3), dec[1].node.layout)
    with socket.create_server(("127.0.0.1", 0)) as silent, contextlib.closing(quick):  # accepts, never answers
        quiet = dataclasses.replace(parsed, source_endpoint=f"127.0.0.1:{silent.getsockname()[1]}")
        engine = dec[0]
        engine.add_request("silent", PROMPT, GREEDY, kv_source=quick.open(quiet.to_bytes()),
                           prior_output_ids=[first])
        assert [first] + [t for out in run(engine) for t in out.new_token_ids] == expected
        quick.check_integrity()
    prefill[1].discard("dead")
    assert_no_leak(prefill, dec)


@pytest.mark.parametrize("path", ["shm", "tcp"])
def test_pull_after_the_lease_ended_and_its_slot_was_reused_recomputes(
        workers: tuple[Worker, Worker], expected: list[int], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, path: str) -> None:
    """A consumer slower than the lease: the partial block's slot went to another request,
    which wrote its own KV there. The pull must fail as stale (then recompute), never import
    that request's KV."""
    prefill, dec = workers
    if path == "tcp":
        monkeypatch.setattr(pull, "shm_reachable", lambda handle: False)
    rid = f"late-{path}"
    first, handle, _, _ = prefill_publish(prefill, rid, PROMPT)
    partial = KVHandle.from_bytes(handle).block_slots[-1]
    node = prefill[1].node
    assert node.discard(rid)  # the lease ended before the consumer pulled
    grabbed = node.allocator.allocate(node.allocator.num_free)  # another request takes every free slot
    assert grabbed is not None and partial in grabbed
    node.pool.array[:, partial] = 0x7F  # ... and writes its own KV into ours
    with caplog.at_level(logging.WARNING, logger=pull.__name__):
        assert decode(dec, rid, PROMPT, first, handle) == expected
    assert f"[stale]: stale slot {partial}: expected generation" in caplog.text
    node.allocator.free(grabbed)
    assert_no_leak(prefill, dec)


def test_worker_services_hand_off_and_report_transfer(workers: tuple[Worker, Worker], expected: list[int]) -> None:
    prefill_svc = WorkerService(workers[0][0], "prefill", workers[0][1])
    decode_svc = WorkerService(workers[1][0], "decode", workers[1][1])
    try:
        for i in range(4):
            rid = f"svc-{i}"
            sink = QueueSink()
            prefill_svc.submit(WorkerJob(rid, "context_only", tuple(PROMPT), GREEDY), sink)
            prefill_updates = sink.collect()
            # The first token comes first (sent before the KV publish), the hand-off last (one
            # response when both were queued together).
            assert len(prefill_updates[0].new_token_ids) == 1 and prefill_updates[-1].context_phase_params
            assert len(prefill_updates) <= 2
            handoff = merge_updates(prefill_updates)
            # the publish is a local copy: its time counts toward the transfer, its bytes do not
            assert handoff.kv_transfer_bytes == 0 and handoff.kv_transfer_ns > 0
            node = workers[1][1].node
            with node._lock:
                held = node.store.lookup(node.hashes(PROMPT[:48])).num_blocks
            assert held == 3 or i == 0  # after the first request, its 3 full blocks stay here
            sink = QueueSink()
            decode_svc.submit(WorkerJob(rid, "generation_only", tuple(PROMPT), GREEDY,
                                        handoff.new_token_ids, handoff.context_phase_params), sink)
            updates = sink.collect()
            assert list(handoff.new_token_ids) + [t for u in updates for t in u.new_token_ids] == expected
            # the decode pulls the blocks it lacks: the prompt's 4 (3 full + the partial one,
            # which no store holds) less the full ones its store held (from earlier requests)
            lacked = 4 - held
            assert updates[0].kv_transfer_ns > 0
            assert updates[0].kv_transfer_bytes == lacked * 16 * BYTES_PER_TOKEN
            # Imported KV is a transfer, not a prefix hit of the decode worker's own cache.
            assert [u.num_cached_tokens for u in updates] == [0] * len(updates)
            if i > 0:  # the prefill node now holds the prompt's 3 full blocks
                assert handoff.num_cached_tokens == 48
    finally:
        prefill_svc.close()
        decode_svc.close()
    assert workers[1][0].importer.closed  # the engine thread closed its engine's import threads
    assert_no_leak(*workers)


def test_node_config_reads_pool_and_cold_sizes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.serving.kv import COLD_BLOCKS_ENV, POOL_BLOCKS_ENV, node_config

    monkeypatch.delenv("KVBRIDGE_MASTER", raising=False)
    monkeypatch.delenv(POOL_BLOCKS_ENV, raising=False)
    monkeypatch.delenv(COLD_BLOCKS_ENV, raising=False)
    default = node_config("n", "m", 64)
    assert (default.pool_blocks, default.hot_capacity_blocks, default.cold_capacity_blocks) == (128, 64, 0)
    assert default.master_address is None
    monkeypatch.setenv(POOL_BLOCKS_ENV, "40")
    monkeypatch.setenv(COLD_BLOCKS_ENV, "300")
    monkeypatch.setenv("KVBRIDGE_MASTER", "10.0.0.7:5555")
    sized = node_config("n", "m", 64)
    assert (sized.pool_blocks, sized.hot_capacity_blocks, sized.cold_capacity_blocks) == (40, 20, 300)
    assert sized.master_address == ("10.0.0.7", 5555)
    monkeypatch.setenv(COLD_BLOCKS_ENV, "lots")
    with pytest.raises(ValueError, match=r"^PD_KV_COLD_BLOCKS: expected a positive integer, got 'lots'$"):
        node_config("n", "m", 64)
