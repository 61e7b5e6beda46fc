"""Hostile or careless peers against the block server and the master (issue 8): stuck pulls,
trickled and oversized frames, idle connections, connection floods, huge batch inserts. Each
limit is asserted exactly; a real pull or a real heartbeat must still go through."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from transport_procs import LAYOUT, Side, assert_pattern, eventually

from kvbridge.auth import Hello, HelloAck
from kvbridge.master.client import MasterClient
from kvbridge.master.messages import InsertBlocks, LoadReport, RegisterNode
from kvbridge.master.server import HELLO_MAX_FRAME_BYTES as MASTER_HELLO_MAX
from kvbridge.master.server import MasterConfig, MasterThread
from kvbridge.protocol import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    ErrorReply,
    Ok,
    encode_frame,
    recv_message,
)
from kvbridge.transport.base import TransferSpec
from kvbridge.transport.messages import PullRequest
from kvbridge.transport.tcp import TcpTransport
from kvbridge.transport.tcp_server import (
    HELLO_MAX_FRAME_BYTES,
    REQUEST_MAX_FRAME_BYTES,
    BlockServer,
)


def block_server(max_wait_s: float) -> BlockServer:
    return BlockServer("127.0.0.1", 0, token=None, chunk_bytes=1 << 16, sock_buf_bytes=1 << 16,
                       max_connections=4, auth_timeout_s=0.5, frame_timeout_s=0.5, max_wait_s=max_wait_s)


@pytest.fixture()
def server() -> Iterator[BlockServer]:
    srv = block_server(0.6)
    yield srv
    srv.close()


def connect(srv: BlockServer, hello: bool = True) -> socket.socket:
    sock = socket.create_connection(srv.address, timeout=5.0)
    if hello:
        sock.sendall(encode_frame(Hello("", "test")))
        assert recv_message(sock) == HelloAck("kvbridge-block-server")
    return sock


def open_conns(srv: BlockServer) -> int:
    with srv._lock:
        return len(srv._conns)


def closed_by_server(sock: socket.socket) -> ErrorReply | None:
    """The server's last word on ``sock`` (an ErrorReply or nothing), after which it closed it."""
    with sock:
        sock.settimeout(5.0)
        try:
            reply = recv_message(sock)
        except Exception:  # closed without a reply
            return None
        assert sock.recv(1) == b""
        return reply if isinstance(reply, ErrorReply) else None


def stuck_pull(timeout_s: float) -> bytes:
    return encode_frame(PullRequest("never-published", (), "", 1, 64, timeout_s, False))


def test_pulls_that_wait_for_nothing_free_their_thread_when_the_peer_leaves() -> None:
    with contextlib.closing(block_server(60.0)) as server:  # the wait alone would hold them 60 s
        _check_peers_leave(server)


def _check_peers_leave(server: BlockServer) -> None:
    socks = [connect(server) for _ in range(4)]
    for sock in socks:
        sock.sendall(stuck_pull(3600.0))
    assert open_conns(server) == 4
    for sock in socks:
        sock.close()
    assert eventually(lambda: open_conns(server) == 0, timeout_s=2.0)


def test_a_waiting_pull_is_cut_at_max_wait_s(server: BlockServer) -> None:
    sock = connect(server)
    start = time.monotonic()
    sock.sendall(stuck_pull(3600.0))
    reply = closed_by_server(sock)
    assert reply is not None and reply.code == "timeout", reply
    assert "after 0.6" in reply.message and time.monotonic() - start < 5.0


def test_oversized_or_trickled_frames_are_refused(server: BlockServer) -> None:
    sock = connect(server, hello=False)  # announces a 16 MiB Hello: refused before any buffer
    sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, 16 << 20))
    reply = closed_by_server(sock)
    assert reply is not None and reply.code == "protocol"
    assert reply.message.endswith(f"body of {16 << 20} bytes exceeds max_frame_bytes={HELLO_MAX_FRAME_BYTES}")
    sock = connect(server)  # after Hello: a request frame above 1 MiB
    sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, REQUEST_MAX_FRAME_BYTES + 1))
    reply = closed_by_server(sock)
    assert reply is not None and reply.message.endswith(
        f"body of {REQUEST_MAX_FRAME_BYTES + 1} bytes exceeds max_frame_bytes={REQUEST_MAX_FRAME_BYTES}")
    hello = encode_frame(Hello("", "slow"))
    for authed in (False, True):  # one byte at a time, each well inside any per-recv timeout
        sock = connect(server, hello=authed)
        frame = stuck_pull(1.0) if authed else hello
        start = time.monotonic()
        with sock:
            try:
                for i in range(len(frame) - 1):
                    sock.sendall(frame[i:i + 1])
                    time.sleep(0.1)
                    assert time.monotonic() - start < 3.0, "the server kept a trickling frame"
            except OSError:
                pass  # the server cut us off: the frame had 0.5 s in all
        assert eventually(lambda: open_conns(server) == 0, timeout_s=2.0)


def test_idle_connections_give_way_to_a_real_pull(server: BlockServer) -> None:
    idle = [connect(server) for _ in range(4)]
    assert open_conns(server) == 4
    src, dst = Side(source=True), Side(source=False)
    server.serve_pool(src.pool, src.alloc)
    consumer = TcpTransport()
    try:
        nbytes = len(src.slots) * LAYOUT.block_bytes
        spec = TransferSpec("", LAYOUT.num_layers, nbytes, server.endpoint, source_slots=src.slots,
                            pool_name=src.pool.handle.name, source_gens=src.alloc.generations(src.slots))
        recv = consumer.start_recv(spec, dst.region())
        recv.wait(time.monotonic() + 5.0)
        recv.close()
        assert_pattern(dst.pool, dst.slots)
        assert closed_by_server(idle[0]) is None  # the longest idle made room
        assert all(s.fileno() != -1 for s in idle[1:])
    finally:
        for sock in idle:
            sock.close()
        consumer.close()
        src.pool.close()
        dst.pool.close()


@pytest.fixture()
def master() -> Iterator[MasterThread]:
    with MasterThread(MasterConfig(heartbeat_timeout_s=5.0, max_connections=4, auth_timeout_s=0.5)) as m:
        yield m


def test_master_caps_connections_and_small_hello(master: MasterThread) -> None:
    conns = [socket.create_connection(master.address, timeout=5.0) for _ in range(4)]
    assert eventually(lambda: len(master.server._conns) == 4, timeout_s=2.0)
    extra = socket.create_connection(master.address, timeout=5.0)
    assert extra.recv(1) == b""  # closed at once
    for sock in conns:
        sock.close()
    assert eventually(lambda: len(master.server._conns) == 0, timeout_s=2.0)
    sock = socket.create_connection(master.address, timeout=5.0)
    sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, 16 << 20))
    reply = closed_by_server(sock)
    assert reply is not None and reply.message.endswith(f"exceeds max_frame_bytes={MASTER_HELLO_MAX}")


def test_huge_batch_insert_does_not_starve_heartbeats(master: MasterThread) -> None:
    host, port = master.address
    with MasterClient(host, port, node_id="hb", timeout_s=5.0) as beat:
        beat.register("hb:1")
        big = socket.create_connection(master.address, timeout=30.0)
        big.sendall(encode_frame(Hello("", "big")))
        assert recv_message(big) == HelloAck("kvbridge-master")
        big.sendall(encode_frame(RegisterNode("big", "big:1", LoadReport())))
        assert recv_message(big) == Ok()
        hashes = tuple(i.to_bytes(8, "little") for i in range(300_000))
        answered: list[float] = []
        done = threading.Event()

        def beat_while_inserting() -> None:
            while not done.is_set():
                beat.heartbeat(LoadReport())
                answered.append(time.monotonic())

        thread = threading.Thread(target=beat_while_inserting)
        sent = time.monotonic()
        big.sendall(encode_frame(InsertBlocks("big", "hot", hashes)))
        thread.start()
        assert recv_message(big) == Ok()
        insert_done = time.monotonic()
        done.set()
        thread.join(10.0)
        big.close()
        assert master.server.index.lookup(hashes[:3])[0].num_blocks == 3
        # heartbeats were answered between the insert's slices: no silence as long as half the
        # insert (unsliced, the loop is deaf for the whole indexing, most of the insert's time)
        during = [sent, *[t for t in answered if t < insert_done], insert_done]
        longest = max(b - a for a, b in zip(during, during[1:], strict=False))
        assert longest < (insert_done - sent) / 2, (longest, insert_done - sent, len(during))
