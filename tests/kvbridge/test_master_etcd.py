"""Membership, leases and master failover on a real etcd (issue 13).

Each test starts its own etcd (etcd_server.py) and real masters (in-process MasterThreads, or
`triton-pd master` processes where one must be SIGKILLed); nodes are real MasterClients,
KVNodes, or a node process. Skipped when the etcd binary or the etcd3gw package is missing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from etcd_server import EtcdServer, free_port, require_etcd, stop_process, wait_for
from kv_exports import random_export

from kvbridge import (
    KVLayoutSpec,
    KVNode,
    KVNodeConfig,
    LoadReport,
    MasterClient,
    MasterConfig,
    MasterThread,
)
from kvbridge.errors import KVBridgeError, RemoteError
from kvbridge.etcd import Etcd, EtcdConfig
from kvbridge.master.election import current_leader
from kvbridge.master.messages import NodeMatch
from kvbridge.membership import DuplicateNodeId

H = [bytes([i]) * 8 for i in range(6)]
LAYOUT = KVLayoutSpec("float32", 2, 4, 8, 32)  # 2 layers, 4 tokens a block, 8 floats a token
PROMPT = list(range(100, 108))  # two full blocks
CLI = ("import argparse,sys; from kvbridge.cli import register; p=argparse.ArgumentParser(); "
       "register(p.add_subparsers()); a=p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


@pytest.fixture()
def etcd() -> Iterator[EtcdServer]:
    require_etcd()
    server = EtcdServer()
    try:
        yield server
    finally:
        server.close()


def leading_master(etcd: EtcdServer) -> MasterThread:
    master = MasterThread(MasterConfig(etcd=EtcdConfig.parse(etcd.endpoint), leader_ttl_s=2,
                                       heartbeat_timeout_s=60.0))
    wait_for(lambda: master.server.role.leading, 10.0, "the only master leads")
    return master


def node_client(master: MasterThread, node_id: str, etcd: EtcdServer | None, ttl_s: int = 10) -> MasterClient:
    config = None if etcd is None else EtcdConfig(EtcdConfig.parse(etcd.endpoint).endpoints, node_ttl_s=ttl_s)
    return MasterClient(*master.address, node_id=node_id, timeout_s=2.0, etcd=config)


def listed(master: MasterThread) -> list[tuple[str, str, int]]:
    with MasterClient(*master.address, node_id="observer", timeout_s=2.0, etcd=None) as observer:
        return [(n.node_id, n.endpoint, n.num_blocks) for n in observer.nodes()]


def test_duplicate_live_node_id_is_refused_naming_the_id(etcd: EtcdServer) -> None:
    master = leading_master(etcd)
    first = node_client(master, "srv-a/decode#7", etcd)
    second = node_client(master, "srv-a/decode#7", etcd)
    rogue = node_client(master, "rogue", None)  # no etcd: the leader does not admit it
    try:
        first.register("127.0.0.1:9001")
        first.insert("hot", H[:2])
        with pytest.raises(DuplicateNodeId) as refused:
            second.register("127.0.0.1:9002")
        assert str(refused.value) == (
            "node_id: 'srv-a/decode#7' is already registered by a live node at 127.0.0.1:9001 (this one "
            "is at 127.0.0.1:9002; etcd key /kvbridge/nodes/srv-a/decode#7); each node needs its own id")
        assert listed(master) == [("srv-a/decode#7", "127.0.0.1:9001", 2)]
        with pytest.raises(RemoteError, match=r"\[not_member\]: node_id: 'rogue' holds no key in etcd "
                                              r"\(/kvbridge/nodes/rogue\)"):
            rogue.register("127.0.0.1:9003")
        first.close()  # leaves: its lease is revoked, the master drops it, the id is free
        wait_for(lambda: listed(master) == [], 5.0, "a node that left dropped")
        second.register("127.0.0.1:9002")
        assert listed(master) == [("srv-a/decode#7", "127.0.0.1:9002", 0)]
    finally:
        for client in (first, second, rogue):
            client.close()
        master.close()
    master.server.index.check_integrity()


def test_a_kv_node_with_a_live_nodes_id_refuses_to_start(etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    master = leading_master(etcd)
    monkeypatch.setenv("KVBRIDGE_ETCD", etcd.endpoint)
    config = KVNodeConfig("srv-a/prefill#3", "m", 16, 16, master_address=master.address)
    first, second = KVNode(config, LAYOUT), KVNode(config, LAYOUT)
    try:
        first.start_heartbeats(LoadReport)
        with pytest.raises(DuplicateNodeId, match=r"^node_id: 'srv-a/prefill#3' is already registered by a "
                                                  rf"live node at {first.endpoint} \(this one is at "
                                                  rf"{second.endpoint};"):
            second.start_heartbeats(LoadReport)
        assert listed(master) == [("srv-a/prefill#3", first.endpoint, 0)]
    finally:
        second.close()
        first.close()
        master.close()


NODE_PROCESS = """
import sys, time
from kvbridge import LoadReport, MasterClient
from kvbridge.etcd import EtcdConfig
config = EtcdConfig(EtcdConfig.parse(sys.argv[1]).endpoints, node_ttl_s=2)
client = MasterClient("127.0.0.1", int(sys.argv[2]), node_id="doomed", timeout_s=2.0, etcd=config)
client.register("127.0.0.1:9100")
client.insert("hot", [bytes([i]) * 8 for i in range(3)])
client.start_heartbeats(0.2, LoadReport)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_node_whose_lease_expires_leaves_the_index(etcd: EtcdServer) -> None:
    """The master's heartbeat timeout is 60 s: only the etcd lease (ttl 2 s) can drop the node."""
    master = leading_master(etcd)
    proc = subprocess.Popen([sys.executable, "-c", NODE_PROCESS, etcd.endpoint, str(master.address[1])],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(2.5)  # past one ttl: the heartbeats keep the lease alive
        assert listed(master) == [("doomed", "127.0.0.1:9100", 3)]
        proc.kill()
        proc.wait(10)
        waited = wait_for(lambda: listed(master) == [], 8.0, "the dead node's entries dropped")
        assert 1.0 <= waited <= 6.0  # the 2 s lease runs out, the leader polls every 0.67 s
        with MasterClient(*master.address, node_id="observer", timeout_s=2.0, etcd=None) as observer:
            assert observer.lookup(H[:3]) == ()
        etcd_client = Etcd(EtcdConfig.parse(etcd.endpoint))
        assert etcd_client.get("/kvbridge/nodes/doomed") is None
        etcd_client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
        master.close()
    master.server.index.check_integrity()


class MasterProcess:
    """`triton-pd master --etcd ...` as a process of its own (stderr: its log, in a file)."""

    def __init__(self, etcd: EtcdServer, log_dir: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"master-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CLI, "master", "--port", str(self.port), "--etcd", etcd.endpoint,
                 "--leader-ttl", "2", "--heartbeat-timeout", "60"], stdin=subprocess.DEVNULL, stderr=log)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        stop_process(self.proc)


def status(etcd: EtcdServer) -> list[str]:
    done = subprocess.run([sys.executable, "-c", CLI, "master", "status", "--etcd", etcd.endpoint],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "KVBRIDGE_ETCD": ""})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_sigkill_of_the_leader_the_standby_leads_and_the_index_is_rebuilt(
        etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    etcd_config = EtcdConfig.parse(etcd.endpoint)
    view = Etcd(etcd_config)
    log_dir = tempfile.mkdtemp(prefix="kvb-masters-")
    a, b = MasterProcess(etcd, log_dir), MasterProcess(etcd, log_dir)
    node: KVNode | None = None
    try:
        wait_for(lambda: current_leader(view) is not None, 20.0, "a master leads")
        leader, standby = (a, b) if current_leader(view) == ("127.0.0.1", a.port) else (b, a)
        wait_for(lambda: f"kvbridge master {standby.address} stands by" in standby.log(), 10.0,
                 "the other master stands by")
        monkeypatch.setenv("KVBRIDGE_ETCD", etcd.endpoint)
        # the configured address is the standby: the node still finds the leader through etcd
        node = KVNode(KVNodeConfig("srv-a/decode#1", "m", 16, 16, master_address=("127.0.0.1", standby.port)),
                      LAYOUT)
        node.start_heartbeats(LoadReport)
        node.publish(random_export("r1", 8, 1, LAYOUT), PROMPT)
        chain = node.hashes(PROMPT)
        expected = (NodeMatch("srv-a/decode#1", node.endpoint, 2),)
        with MasterClient("127.0.0.1", standby.port, node_id="observer", timeout_s=2.0, etcd=etcd_config) as obs:
            wait_for(lambda: obs.lookup(chain) == expected, 10.0, "the leader indexes the node's prefix")
            assert obs.address == ("127.0.0.1", leader.port)
            lines = status(etcd)
            assert lines[0] == f"etcd {etcd.endpoint}: leader {leader.address}; standby {standby.address}; " \
                               "1 node lease(s)"
            assert lines[1] == f"master {leader.address}: 1 node(s), 2 block entries"
            assert lines[3].split()[:3] == ["srv-a/decode#1", node.endpoint, "2"]

            leader.proc.send_signal(signal.SIGKILL)
            leader.proc.wait(10)
            waited = wait_for(lambda: current_leader(view) == ("127.0.0.1", standby.port), 10.0,
                              "the standby leads")
            assert waited <= 6.0  # the dead leader's 2 s lease, then a round of the standby (0.67 s)
            # no new request: the node registers again with the new leader and re-publishes
            wait_for(lambda: _lookup(obs, chain) == expected, 10.0, "the new leader finds the prefix again")
            assert obs.address == ("127.0.0.1", standby.port)
        assert f"kvbridge master {standby.address} leads" in standby.log()
        assert "kvbridge master: node srv-a/decode#1 joined at" in standby.log()
        lines = status(etcd)
        assert lines[0] == f"etcd {etcd.endpoint}: leader {standby.address}; standby none; 1 node lease(s)"
        assert lines[1] == f"master {standby.address}: 1 node(s), 2 block entries"
        node.check_integrity()
    finally:
        if node is not None:
            node.close()
        for master in (a, b):
            master.stop()
        view.close()
        for path in Path(log_dir).iterdir():
            path.unlink()
        os.rmdir(log_dir)


def _lookup(client: MasterClient, chain: Sequence[bytes]) -> tuple[NodeMatch, ...]:
    """The lookup's matches; () while no master leads (or answers)."""
    try:
        return client.lookup(chain)
    except (KVBridgeError, OSError):
        return ()


def test_a_hung_etcd_costs_a_deadline_not_a_hang(etcd: EtcdServer) -> None:
    """SIGSTOP etcd: a new client's lookup waits one etcd deadline, then uses the configured
    master; the leader leads on until its lease may have expired, then stands down."""
    master = leading_master(etcd)
    config = EtcdConfig(EtcdConfig.parse(etcd.endpoint).endpoints, timeout_s=0.2)
    n1 = node_client(master, "n1", etcd)
    n1.register("127.0.0.1:9200")
    n1.insert("hot", H[:2])
    etcd.proc.send_signal(signal.SIGSTOP)
    try:
        with MasterClient(*master.address, node_id="lookup", timeout_s=1.0, etcd=config) as client:
            start = time.monotonic()
            assert client.lookup(H[:3]) == (NodeMatch("n1", "127.0.0.1:9200", 2),)
            assert time.monotonic() - start < 1.5  # the etcd deadline (0.2 s), then the configured master
        wait_for(lambda: not master.server.role.leading, 8.0, "the leader stands down without etcd")
        with MasterClient(*master.address, node_id="lookup", timeout_s=1.0, etcd=config) as client:
            start = time.monotonic()
            with pytest.raises(RemoteError, match=r"\[not_leader\]: master 127.0.0.1:\d+ stands by"):
                client.lookup(H[:2])
            assert time.monotonic() - start < 2.0
    finally:
        etcd.proc.send_signal(signal.SIGCONT)
        n1.close()
        master.close()


def test_serve_starts_a_candidate_master_and_a_closed_leader_hands_over_at_once(
        etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """`triton-pd serve`'s master process (backends/launch) joins the election when
    KVBRIDGE_ETCD names a loopback etcd; a leader that stops cleanly revokes its lease, so the
    other leads within a round (1.7 s at the default ttl of 5 s), not after the ttl."""
    from backends.launch.master_process import MasterProcess as ServeMaster

    monkeypatch.setenv("KVBRIDGE_ETCD", etcd.endpoint)
    monkeypatch.delenv("KVBRIDGE_MASTER", raising=False)
    view = Etcd(EtcdConfig.parse(etcd.endpoint))
    notes: list[str] = []
    first = ServeMaster.start_if_needed(notes.append)
    assert first is not None
    second = ServeMaster(free_port(), 10.0, notes.append)
    try:
        assert os.environ["KVBRIDGE_MASTER"] == f"127.0.0.1:{first.port}"
        assert notes[0] == (f"triton-pd: kvbridge master (pid {first.pid}) on 127.0.0.1:{first.port} "
                            f"(a candidate for the lead in etcd {etcd.endpoint})")
        wait_for(lambda: current_leader(view) is not None, 10.0, "a serve master leads")
        leader, other = (first, second) if current_leader(view) == ("127.0.0.1", first.port) else (second, first)
        leader.close()
        waited = wait_for(lambda: current_leader(view) == ("127.0.0.1", other.port), 10.0, "the other leads")
        assert waited < 4.5  # a round (1.7 s), well before the 5 s lease would have run out
    finally:
        first.close()
        second.close()
        view.close()


def test_serve_refuses_a_loopback_master_for_an_etcd_beyond_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.launch.master_process import MasterProcess as ServeMaster

    monkeypatch.setenv("KVBRIDGE_ETCD", "10.1.2.3:2379")
    monkeypatch.delenv("KVBRIDGE_MASTER", raising=False)
    with pytest.raises(ValueError, match=r"^KVBRIDGE_ETCD names an etcd beyond this host \(10.1.2.3:2379\) and "
                                         r"KVBRIDGE_MASTER is unset: a master started here would listen on "
                                         r"loopback only\."):
        ServeMaster.start_if_needed(print)


def test_etcd_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVBRIDGE_ETCD", raising=False)
    assert EtcdConfig.from_env() is None
    monkeypatch.setenv("KVBRIDGE_ETCD", "http://10.0.0.1:2379, 10.0.0.2:2380/")
    config = EtcdConfig.from_env()
    assert config == EtcdConfig((("10.0.0.1", 2379), ("10.0.0.2", 2380)))
    assert (config.describe(), config.on_loopback) == ("10.0.0.1:2379,10.0.0.2:2380", False)
    assert config.node_key("a/decode#7") == "/kvbridge/nodes/a/decode#7"
    for bad in ("10.0.0.1", "10.0.0.1:0", ":2379", "a:1,b"):
        with pytest.raises(ValueError, match=rf"^KVBRIDGE_ETCD: expected 'host:port\[,host:port...\]', "
                                             rf"got '{bad}'$"):
            EtcdConfig.parse(bad)
    with pytest.raises(ValueError, match=r"^node_ttl_s: expected >= 2 \(etcd's shortest lease\), got 1$"):
        EtcdConfig((("127.0.0.1", 2379),), node_ttl_s=1)
