"""The master over real sockets: three nodes, longest-prefix lookup, heartbeats, bad frames."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import msgpack
import pytest

from kvbridge.auth import Hello, HelloAck
from kvbridge.errors import RemoteError
from kvbridge.master.client import MasterClient
from kvbridge.master.index import ClusterIndex
from kvbridge.master.messages import LoadReport, Lookup, NodeMatch
from kvbridge.master.server import MasterConfig, MasterThread
from kvbridge.protocol import HEADER, MAGIC, ErrorReply, encode_frame, recv_message

H = [bytes([i]) * 8 for i in range(6)]


@pytest.fixture()
def master() -> Iterator[MasterThread]:
    with MasterThread(MasterConfig(heartbeat_timeout_s=0.6, token="secret")) as m:
        yield m


def client(m: MasterThread, node: str, token: str = "secret") -> MasterClient:
    host, port = m.address
    return MasterClient(host, port, node_id=node, token=token, timeout_s=5.0)


def test_three_nodes_longest_prefix(master: MasterThread) -> None:
    a, b, c = (client(master, n) for n in ("a", "b", "c"))
    try:
        for i, node in enumerate((a, b, c)):
            node.register(f"10.0.0.{i}:9000", LoadReport(queue_len=i, num_running=1, num_free_blocks=100))
        a.insert("hot", H[:4])
        b.insert("active", H[:2])
        b.insert("cold", [H[2]])
        c.insert("hot", H[1:5])  # no first block: matches nothing
        assert a.lookup(H[:5]) == (
            NodeMatch("a", "10.0.0.0:9000", 4), NodeMatch("b", "10.0.0.1:9000", 3),
        )
        assert c.lookup(H[1:3]) == (
            NodeMatch("a", "10.0.0.0:9000", 2), NodeMatch("b", "10.0.0.1:9000", 2),
            NodeMatch("c", "10.0.0.2:9000", 2),
        )
        assert c.lookup([H[5]]) == ()
        a.remove("hot", [H[1]])
        assert b.lookup(H[:5]) == (NodeMatch("b", "10.0.0.1:9000", 3), NodeMatch("a", "10.0.0.0:9000", 1))
        assert [(n.node_id, n.num_blocks, n.load.queue_len) for n in a.nodes()] == [
            ("a", 3, 0), ("b", 3, 1), ("c", 4, 2),
        ]
        with client(master, "z") as z, pytest.raises(RemoteError, match=r"\[unknown_node\]: node_id: unknown node 'z'"):
            z.insert("hot", H[:1])
    finally:
        for node in (a, b, c):
            node.close()
    master.server.index.check_integrity()


def test_silent_node_dropped_within_timeout(master: MasterThread) -> None:
    a, b, c = (client(master, n) for n in ("a", "b", "c"))
    try:
        for node in (a, b, c):
            node.register(f"{node.node_id}:1")
            node.insert("hot", H[:3])
        a.start_heartbeats(0.1, lambda: LoadReport(queue_len=7))
        b.start_heartbeats(0.1, LoadReport)
        start = time.monotonic()
        while [n.node_id for n in a.nodes()] != ["a", "b"]:
            assert time.monotonic() - start < 3.0, "silent node c was not dropped"
            time.sleep(0.05)
        # dropped after the 0.6 s timeout, found by the reaper within its 0.15 s period
        assert 0.5 <= time.monotonic() - start <= 1.5
        assert a.lookup(H[:3]) == (NodeMatch("a", "a:1", 3), NodeMatch("b", "b:1", 3))
        assert a.nodes()[0].load == LoadReport(queue_len=7)
    finally:
        for node in (a, b, c):
            node.close()
    master.server.index.check_integrity()


def raw_conn(m: MasterThread) -> socket.socket:
    sock = socket.create_connection(m.address, timeout=5.0)
    return sock


def rejected(sock: socket.socket, payload: bytes) -> ErrorReply:
    with sock:
        sock.sendall(payload)
        reply = recv_message(sock)
        assert isinstance(reply, ErrorReply)
        assert sock.recv(1) == b""  # the server closed this connection
        return reply


def authed(m: MasterThread) -> socket.socket:
    sock = raw_conn(m)
    sock.sendall(encode_frame(Hello("secret", "raw")))
    assert recv_message(sock) == HelloAck("kvbridge-master")
    return sock


def test_bad_frames_rejected_and_master_keeps_serving(master: MasterThread) -> None:
    good = client(master, "a")
    good.register("a:1")
    good.insert("hot", H[:2])
    body = msgpack.packb(["lookup", [H[0]]])
    cases = [
        (authed(master), b"GARBAGE!!!", "protocol", r"bad magic b'GARB'"),
        (authed(master), HEADER.pack(MAGIC, 9, len(body)) + body, "protocol", "unsupported protocol version 9"),
        (authed(master), HEADER.pack(MAGIC, 1, 1 << 30), "protocol", "body of 1073741824 bytes exceeds"),
        (authed(master), HEADER.pack(MAGIC, 1, 3) + b"\xc1\xc1\xc1", "protocol", "undecodable msgpack"),
        (raw_conn(master), encode_frame(Hello("wrong", "x")), "auth", "bad token from peer 'x'"),
        (raw_conn(master), encode_frame(Lookup((H[0],))), "auth", "expected Hello as the first frame, got Lookup"),
    ]
    for sock, payload, code, message in cases:
        reply = rejected(sock, payload)
        assert reply.code == code
        assert message in reply.message
        assert good.lookup(H[:2]) == (NodeMatch("a", "a:1", 2),)
    with client(master, "b", token="nope") as b, pytest.raises(RemoteError, match=r"\[auth\]: bad token from peer 'b'"):
        b.lookup(H[:1])
    good.close()


def test_non_loopback_requires_token() -> None:
    with pytest.raises(ValueError, match=r"binding '0.0.0.0' beyond loopback requires a token"):
        MasterConfig(host="0.0.0.0")


def test_cluster_index_against_oracle() -> None:
    rng = random.Random(1)
    index = ClusterIndex()
    oracle: dict[str, set[tuple[bytes, str]]] = {}
    hashes = [bytes([i]) for i in range(8)]
    for step in range(400):
        node = rng.choice("pqr")
        op = rng.choice(["insert", "remove", "drop", "lookup"])
        if node not in oracle:
            index.register(node, f"{node}:1", LoadReport(), now=float(step))
            oracle[node] = set()
        picked = rng.sample(hashes, rng.randint(1, 4))
        tier = rng.choice(["hot", "cold"])
        if op == "insert":
            index.insert(node, tier, picked)
            oracle[node] |= {(h, tier) for h in picked}
        elif op == "remove":
            index.remove(node, tier, picked)
            oracle[node] -= {(h, tier) for h in picked}
        elif op == "drop":
            index.drop(node)
            del oracle[node]
        else:
            chain = rng.sample(hashes, rng.randint(1, 8))
            expected = {}
            for n, held in oracle.items():
                have = {h for h, _ in held}
                k = next((i for i, h in enumerate(chain) if h not in have), len(chain))
                if k:
                    expected[n] = k
            assert {m.node_id: m.num_blocks for m in index.lookup(chain)} == expected
        index.check_integrity()
        assert index.num_entries == sum(len(v) for v in oracle.values())


def test_cli_serves_and_refuses_exposed_bind_without_token() -> None:
    code = "import argparse,sys; from kvbridge.cli import register; p=argparse.ArgumentParser(); " \
           "register(p.add_subparsers()); a=p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    bad = subprocess.run([sys.executable, "-c", code, "master", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "triton-pd master: host: binding '0.0.0.0' beyond loopback requires a token" in bad.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", code, "master", "--port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with MasterClient("127.0.0.1", port, node_id="x", timeout_s=2.0) as c:
                    assert c.nodes() == ()
                break
            except OSError:
                assert time.monotonic() < deadline, "master CLI did not start"
                time.sleep(0.1)
        with MasterClient("127.0.0.1", port, node_id="srv/decode#7", timeout_s=2.0) as node:
            node.register("127.0.0.1:9999", LoadReport(2, 1, 30))
            node.insert("hot", H[:3])
            status = subprocess.run([sys.executable, "-c", code, "master", "status", "--address",
                                     f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert lines[0] == f"master 127.0.0.1:{port}: 1 node(s), 3 block entries"
        assert lines[2].split()[:6] == ["srv/decode#7", "127.0.0.1:9999", "3", "1", "2", "30"]
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_status_of_a_master_that_does_not_answer() -> None:
    code = "import argparse,sys; from kvbridge.cli import register; p=argparse.ArgumentParser(); " \
           "register(p.add_subparsers()); a=p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status = subprocess.run([sys.executable, "-c", code, "master", "status", "--address", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 1
    assert status.stderr.startswith(f"triton-pd master status: no answer from 127.0.0.1:{port}: ")
    assert len(status.stderr.strip().splitlines()) == 1


def test_duplicate_node_ids_are_refused_while_the_first_lives(master: MasterThread) -> None:
    with client(master, "same") as first, client(master, "same") as second:
        first.register("10.0.0.1:1")
        first.insert("hot", H[:2])
        with pytest.raises(RemoteError, match=r"\[invalid\]: node_id: 'same' is already registered by a live "
                                              r"node at 10.0.0.1:1 \(this one is at 10.0.0.2:1\); each node "
                                              r"needs its own id"):
            second.register("10.0.0.2:1")
        first.register("10.0.0.1:1")  # the same node again: fine, its entries kept
        assert first.lookup(H[:2]) == (NodeMatch("same", "10.0.0.1:1", 2),)
        time.sleep(0.7)  # silent past the heartbeat timeout (0.6 s): the id is free again
        second.register("10.0.0.2:1")
        assert [m.endpoint for m in second.nodes()] == ["10.0.0.2:1"]
