"""A KVNode and a master that restarts (issue 13): the node registers again by itself and
re-publishes every block it holds, including the ones it stored while the master was down."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

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

LAYOUT = KVLayoutSpec("float32", 2, 4, 8, 32)  # 2 layers, 4 tokens a block, 8 floats a token
P1 = list(range(100, 108))  # two full blocks each
P2 = list(range(200, 208))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _held(port: int, node: KVNode, prompt: list[int]) -> int:
    """Blocks of ``prompt``'s chain the master says ``node`` holds (0 when it cannot say)."""
    try:
        with MasterClient("127.0.0.1", port, node_id="observer", timeout_s=1.0) as observer:
            matches = observer.lookup(node.hashes(prompt))
    except OSError:
        return 0
    return max((m.num_blocks for m in matches if m.node_id == node.config.node_id), default=0)


def _wait(check: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)
    return check()


def test_a_restarted_master_learns_every_block_again() -> None:
    port = _free_port()
    master = MasterThread(MasterConfig(port=port))
    node = KVNode(KVNodeConfig("n1", "m", 16, 16, master_address=("127.0.0.1", port)), LAYOUT)
    try:
        node.start_heartbeats(LoadReport)
        node.publish(random_export("a", 8, 1, LAYOUT), P1)
        assert _wait(lambda: _held(port, node, P1) == 2)
        master.close()
        node.publish(random_export("b", 8, 2, LAYOUT), P2)  # the master is down: its insert is lost
        master = MasterThread(MasterConfig(port=port))  # restarted, empty
        assert _wait(lambda: _held(port, node, P1) == 2 and _held(port, node, P2) == 2)
    finally:
        node.close()
        master.close()
