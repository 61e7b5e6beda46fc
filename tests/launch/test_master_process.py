"""MasterProcess: the kvbridge master in its own process, restarted on the same port when it is
killed, with a real worker-side MasterClient registering again by itself."""

from __future__ import annotations

import os
import signal
import time

from backends.launch.master_process import MasterProcess
from backends.serving.kv_master import MASTER_ENV
from kvbridge.master.client import MasterClient
from kvbridge.master.messages import LoadReport


def _node_ids(port: int) -> list[str]:
    with MasterClient("127.0.0.1", port, node_id="observer", timeout_s=2.0) as client:
        return sorted(n.node_id for n in client.nodes())


def _wait_nodes(port: int, expected: list[str], timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            seen = _node_ids(port)
        except OSError:
            seen = []
        if seen == expected:
            break
        time.sleep(0.1)
    return seen


def test_a_killed_master_is_restarted_and_the_worker_registers_again() -> None:
    lines: list[str] = []
    os.environ.pop(MASTER_ENV, None)
    master = MasterProcess.start_if_needed(lines.append, heartbeat_timeout_s=5.0)
    assert master is not None
    worker = MasterClient("127.0.0.1", master.port, node_id="decode", timeout_s=2.0)
    try:
        assert os.environ[MASTER_ENV] == f"127.0.0.1:{master.port}"
        worker.register("127.0.0.1:1", LoadReport(0, 0, 16))
        worker.start_heartbeats(0.2, lambda: LoadReport(0, 0, 16))
        assert _wait_nodes(master.port, ["decode"], 5) == ["decode"]
        first = master.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while master.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert master.restarts == 1 and master.pid != first
        assert _wait_nodes(master.port, ["decode"], 10) == ["decode"]
    finally:
        worker.close()
        master.close()
        os.environ.pop(MASTER_ENV, None)
    assert lines[0] == f"triton-pd: kvbridge master (pid {first}) on 127.0.0.1:{master.port}"
    assert lines[1] == f"triton-pd: kvbridge master (pid {first}) exited with status -9; restarting it"
    assert lines[2] == f"triton-pd: kvbridge master (pid {master.pid}) on 127.0.0.1:{master.port}"
    assert master._proc.returncode == 0  # stopped by SIGTERM: a clean exit
