"""Cross-node prefix reuse without Triton: two workers (two engines, two kvbridge nodes, real
transports) and a real master. A prompt computed on node A is pulled by node B instead of
recomputed, token for token; B pulls only the blocks it lacks; a dead A or a hung master costs
B nothing but the reuse (recompute; a bounded lookup, then none for a cooldown)."""

from __future__ import annotations

import queue
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from backends.serving import kv_master
from backends.serving.engine_spec import EngineSpec
from backends.serving.kv import NodeTransfer, WorkerLoad, build_worker
from backends.serving.worker import WorkerService
from backends.serving.worker_io import WorkerJob, WorkerUpdate
from kvbridge.master.client import MasterClient
from kvbridge.master.server import MasterConfig, MasterThread
from kvbridge.pull import PrefixSource
from kvbridge.remote import RemoteFinder

TOK = byte_level_tokenizer()
SPEC = EngineSpec(source="tiny-llama", num_blocks=64, max_model_len=512, max_num_seqs=8)
PROMPT = TOK.encode("A long shared system prompt that two servers both see, " * 3)  # 165 tokens
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BLOCK_BYTES_ALL_LAYERS = 16 * 4 * 128 * 4  # block size * layers * kv_width * float32
Worker = tuple[LLMEngine, NodeTransfer]


@pytest.fixture(scope="module")
def master() -> Iterator[MasterThread]:
    with MasterThread(MasterConfig(heartbeat_timeout_s=30.0)) as m:
        yield m


@pytest.fixture(scope="module")
def pair(master: MasterThread) -> Iterator[tuple[Worker, Worker]]:
    host, port = master.address
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(kv_master.MASTER_ENV, f"{host}:{port}")
        mp.setenv(kv_master.SERVER_ENV, "server-a")
        a = build_worker(SPEC, "prefill")
        mp.setenv(kv_master.SERVER_ENV, "server-b")
        b = build_worker(SPEC, "prefill")
    for _, transfer in (a, b):
        transfer.start_heartbeats(lambda: WorkerLoad(0, 0, 0))
    yield a, b
    for _, transfer in (a, b):
        transfer.close()


def expected(prompt: list[int]) -> list[int]:
    engine = LLMEngine("tiny-llama", EngineConfig(block_size=16, num_blocks=64, max_model_len=512))
    [result] = engine.generate([prompt], GREEDY)
    return list(result.output_token_ids)


def run(worker: Worker, rid: str, prompt: list[int], source: Any = None) -> tuple[list[int], int]:
    """(tokens, cached prompt tokens) of a whole request on ``worker``'s engine."""
    engine, _ = worker
    engine.add_request(rid, prompt, GREEDY, kv_source=source)
    tokens: list[int] = []
    cached = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            cached = max(cached, out.num_cached_tokens)
    if source is not None:
        source.close()
    return tokens, cached


def wait_indexed(master: MasterThread, node_id: str, prompt: list[int], blocks: int) -> None:
    from kvbridge.hashing import hash_blocks

    hashes = hash_blocks(prompt, 16, "tiny-llama")
    host, port = master.address
    with MasterClient(host, port, node_id="observer") as client:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(m.node_id == node_id and m.num_blocks >= blocks for m in client.lookup(hashes)):
                return
            time.sleep(0.05)
    raise AssertionError(f"{node_id} never held {blocks} blocks of the prompt")


def test_node_ids_are_unique_per_server_and_process(pair: tuple[Worker, Worker]) -> None:
    (_, a), (_, b) = pair
    assert a.node.config.node_id.startswith("server-a/prefill#")
    assert b.node.config.node_id.startswith("server-b/prefill#")


def test_prefix_computed_on_a_is_pulled_by_b(master: MasterThread, pair: tuple[Worker, Worker]) -> None:
    a, b = pair
    want = expected(PROMPT)
    assert run(a, "on-a", PROMPT) == (want, 0)
    wait_indexed(master, a[1].node.config.node_id, PROMPT, 10)
    remote = b[1].find_remote(PROMPT)
    assert remote is not None and remote.node_id == a[1].node.config.node_id and remote.num_blocks == 10
    source = b[1].prefix_source("on-b", PROMPT, remote)
    assert source is not None and isinstance(source.inner, PrefixSource) and source.inner.num_local == 0
    assert source.inner.num_pulled_bytes == 10 * BLOCK_BYTES_ALL_LAYERS
    before = b[1].import_counts["remote"]
    assert run(b, "on-b", PROMPT, source) == (want, 160)
    assert b[1].import_counts["remote"] == before + 1
    # B now holds the prefix itself: a repeat is a local hit, no remote source
    assert b[1].prefix_source("again", PROMPT, remote) is None
    b[1].node.check_integrity()
    a[1].node.check_integrity()


def test_b_pulls_only_the_blocks_it_lacks(master: MasterThread, pair: tuple[Worker, Worker]) -> None:
    a, b = pair
    longer = TOK.encode("Another shared prefix, long enough for several blocks of KV. " * 4)  # 244 tokens
    run(b, "b-half", longer[:100])  # B holds the first 6 blocks
    run(a, "a-all", longer)  # A holds all 15
    wait_indexed(master, a[1].node.config.node_id, longer, 15)
    remote = b[1].find_remote(longer)
    assert remote is not None and remote.num_blocks == 15
    source = b[1].prefix_source("b-all", longer, remote)
    assert source is not None and source.inner.num_local == 6
    assert source.inner.num_pulled_bytes == 9 * BLOCK_BYTES_ALL_LAYERS
    assert run(b, "b-all", longer, source) == (expected(longer), 240)


def test_dead_remote_falls_back_to_recompute(master: MasterThread, pair: tuple[Worker, Worker]) -> None:
    _, b = pair
    host, port = master.address
    prompt = TOK.encode("Held by a node that died right after telling the master. " * 3)
    with socket.create_server(("127.0.0.1", 0)) as dead:
        dead_endpoint = f"127.0.0.1:{dead.getsockname()[1]}"
    from kvbridge.hashing import hash_blocks

    with MasterClient(host, port, node_id="ghost") as ghost:
        ghost.register(dead_endpoint)
        ghost.insert("hot", hash_blocks(prompt, 16, "tiny-llama"))
        remote = b[1].find_remote(prompt)
        assert remote is not None and remote.node_id == "ghost"
        source = b[1].prefix_source("ghost-b", prompt, remote)
        assert run(b, "ghost-b", prompt, source) == (expected(prompt), 0)  # recomputed
    b[1].node.check_integrity()


def test_hung_master_costs_one_deadline_then_nothing(pair: tuple[Worker, Worker]) -> None:
    _, b = pair
    with socket.create_server(("127.0.0.1", 0)) as hung:  # accepts, never answers
        client = MasterClient("127.0.0.1", hung.getsockname()[1], node_id="x", timeout_s=0.05)
        finder = RemoteFinder(client, "x", cooldown_s=60.0)
        hashes = b[1].node.hashes(PROMPT[:160])
        start = time.monotonic()
        assert finder.find(hashes) is None
        first = time.monotonic() - start
        assert finder.find(hashes) is None
        assert (finder.lookups, finder.failures) == (1, 1)  # the second never asked
        assert first < 1.0
        finder.close()


def test_worker_service_reuses_a_remote_prefix(master: MasterThread, pair: tuple[Worker, Worker]) -> None:
    a, b = pair
    prompt = TOK.encode("Through the worker service: a prefix that only A computed. " * 3)
    run(a, "svc-a", prompt)
    wait_indexed(master, a[1].node.config.node_id, prompt, len(prompt) // 16)
    service = WorkerService(b[0], "prefill", b[1])  # last: closing it closes B's engine
    updates: queue.Queue[WorkerUpdate | BaseException] = queue.Queue()

    class Sink:
        def send(self, update: WorkerUpdate) -> None:
            updates.put(update)

        def fail(self, exc: BaseException) -> None:
            updates.put(exc)

        def is_cancelled(self) -> bool:
            return False

    try:
        service.submit(WorkerJob("svc-b", "context_and_generation", tuple(prompt), GREEDY), Sink())
        tokens: list[int] = []
        cached = 0
        while True:
            item = updates.get(timeout=30)
            assert not isinstance(item, BaseException), item
            tokens += item.new_token_ids
            cached = max(cached, item.num_cached_tokens)
            if item.final:
                break
    finally:
        service.close()
    assert (tokens, cached) == (expected(prompt), len(prompt) // 16 * 16)
