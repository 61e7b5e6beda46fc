"""The worker start path (backends.serving.kv.start_worker) when its node id is taken (issue 13):
a second live node with the same id is refused by etcd with DuplicateNodeId naming the id, and
the refused worker's service and KVNode are closed before the error propagates — no thread, no
shared-memory pool left behind. Real etcd (skips without it), a real master, real engines."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "kvbridge"))
from etcd_server import EtcdServer, require_etcd  # noqa: E402

from backends.serving import kv_master  # noqa: E402
from backends.serving.engine_spec import EngineSpec  # noqa: E402
from backends.serving.kv import build_worker, start_worker  # noqa: E402
from kvbridge import DuplicateNodeId, MasterClient, MasterConfig, MasterThread  # noqa: E402
from kvbridge.etcd import ETCD_ENV, EtcdConfig  # noqa: E402

SPEC = EngineSpec(source="tiny-llama", num_blocks=16, max_model_len=128, max_num_seqs=2)


@pytest.fixture()
def leading_master(monkeypatch: pytest.MonkeyPatch) -> Iterator[MasterThread]:
    require_etcd()
    etcd = EtcdServer()
    master = MasterThread(MasterConfig(etcd=EtcdConfig.parse(etcd.endpoint), leader_ttl_s=2,
                                       heartbeat_timeout_s=60.0))
    try:
        deadline = time.monotonic() + 10
        while not master.server.role.leading:
            assert time.monotonic() < deadline, "the only master leads within 10 s"
            time.sleep(0.05)
        host, port = master.address
        monkeypatch.setenv(ETCD_ENV, etcd.endpoint)
        monkeypatch.setenv(kv_master.MASTER_ENV, f"{host}:{port}")
        monkeypatch.setenv(kv_master.SERVER_ENV, "srv-dup")  # both workers: the same node id
        yield master
    finally:
        master.close()
        etcd.close()


def thread_names() -> list[str]:
    return sorted(t.name for t in threading.enumerate())


def test_a_duplicate_node_id_closes_the_refused_workers_service_and_node(leading_master: MasterThread) -> None:
    engine_a, a = build_worker(SPEC, "prefill")
    service_a = start_worker(engine_a, a, "prefill")
    try:
        before = thread_names()
        engine_b, b = build_worker(SPEC, "prefill")
        pool = Path("/dev/shm", b.node.pool.handle.name)
        assert pool.exists()
        node_id, endpoint = kv_master.worker_node_id("prefill"), b.node.endpoint
        with pytest.raises(DuplicateNodeId) as refused:
            start_worker(engine_b, b, "prefill")
        assert str(refused.value) == (
            f"node_id: {node_id!r} is already registered by a live node at {a.node.endpoint} (this one is "
            f"at {endpoint}; etcd key /kvbridge/nodes/{node_id}); each node needs its own id")
        assert not pool.exists()
        assert (b.node.link, b.node.finder) == (None, None)
        assert thread_names() == before  # the engine, response, forwarding and server threads joined
        with MasterClient(*leading_master.address, node_id="observer", timeout_s=2.0, etcd=None) as observer:
            assert [(n.node_id, n.endpoint) for n in observer.nodes()] == [(node_id, a.node.endpoint)]
    finally:
        service_a.close()
        a.close()
