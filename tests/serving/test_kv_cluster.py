"""ClusterView: the orchestrator's lookups at the kvbridge master never hold a request up for
longer than the deadline, and a master that fails them is left alone for the backoff."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from backends.serving.kv_cluster import ClusterView
from backends.serving.kv_master import worker_node_id
from kvbridge import LoadReport, MasterClient, MasterConfig, MasterThread, hash_blocks

MODEL_ID, BLOCK = "tiny-llama", 16
PROMPT = list(range(100, 164))  # four full blocks


@pytest.fixture
def master() -> Iterator[tuple[str, int]]:
    thread = MasterThread(MasterConfig())
    try:
        yield thread.address
    finally:
        thread.close()


@pytest.fixture
def silent_master() -> Iterator[tuple[str, int]]:
    """A peer that accepts connections and never answers (a hung master)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[:2]


def test_a_lookup_reports_the_blocks_a_local_worker_holds(master: tuple[str, int]) -> None:
    node = MasterClient(*master, node_id=worker_node_id("decode"))
    node.register("127.0.0.1:1", LoadReport(queue_len=3))
    node.insert("active", hash_blocks(PROMPT[:32], BLOCK, MODEL_ID))
    view = ClusterView(MasterClient(*master, node_id="orchestrator"), MODEL_ID, BLOCK, deadline_s=5.0)
    try:
        snapshot = asyncio.run(view.within(PROMPT))
    finally:
        view.close()
        node.close()
    assert snapshot is not None
    assert snapshot.num_prompt_blocks == 4
    assert dict(snapshot.matched_blocks) == {"decode": 2}
    assert dict(snapshot.queue_len) == {"decode": 3}
    assert view.missed == 0


def test_a_hung_master_costs_a_request_the_deadline_then_nothing(silent_master: tuple[str, int]) -> None:
    client = MasterClient(*silent_master, node_id="orchestrator", timeout_s=0.5)
    view = ClusterView(client, MODEL_ID, BLOCK, deadline_s=0.05, backoff_s=60.0)

    async def requests() -> list[tuple[object, float]]:
        out = []
        for _ in range(3):  # while the first lookup waits for its reply (0.5 s)
            start = time.monotonic()
            out.append((await view.within(PROMPT), time.monotonic() - start))
        await asyncio.sleep(1.0)  # the lookup has timed out: the view backs off
        start = time.monotonic()
        out.append((await view.within(PROMPT), time.monotonic() - start))
        return out

    try:
        results = asyncio.run(requests())
    finally:
        view.close()
    assert [snapshot for snapshot, _ in results] == [None, None, None, None]
    assert 0.05 <= results[0][1] < 0.5  # the deadline, not the 0.5 s timeout
    assert all(waited < 0.05 for _, waited in results[1:3])  # a lookup is stuck: no wait at all
    assert results[3][1] < 0.05  # backing off: no lookup at all
    assert view.missed == 4


def test_a_failed_lookup_is_missed_and_starts_the_backoff() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: a refused connection
    view = ClusterView(MasterClient("127.0.0.1", port, node_id="orchestrator", timeout_s=0.5), MODEL_ID, BLOCK,
                       deadline_s=5.0, backoff_s=60.0)

    async def two() -> list[object]:
        return [await view.within(PROMPT), await view.within(PROMPT)]

    try:
        assert asyncio.run(two()) == [None, None]  # refused, then backing off
    finally:
        view.close()
    assert view.missed == 2
