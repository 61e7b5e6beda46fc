"""The guard process: when its launcher is gone it stops the server's process group if one is
left and unlinks the group's stub regions. A real process group stands in for tritonserver: a
Python process started under the stub's file name (what shm_cleanup recognises a stub by), with
a real /dev/shm region second on its command line, as python_backend passes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from backends.launch.guard import Guard
from backends.launch.shm_cleanup import SHM_DIR, STUB_NAME, stub_regions


def _fake_server(tmp_path: Path, region: str) -> subprocess.Popen[bytes]:
    stub = tmp_path / STUB_NAME
    stub.symlink_to(sys.executable)
    model = tmp_path / "model.py"
    model.write_text("import time\ntime.sleep(600)\n")
    # The shell leads the group (tritonserver's place); the "stub" runs in it.
    return subprocess.Popen(["/bin/bash", "-c", f"{stub} {model} {region} & wait"], start_new_session=True)


def _wait(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_launcher_gone_with_its_server_running_stops_the_group_and_unlinks_its_regions(tmp_path: Path) -> None:
    region = f"triton_guard_test_{uuid.uuid4().hex}"
    (SHM_DIR / region).write_bytes(b"x")
    server = _fake_server(tmp_path, region)
    try:
        assert _wait(lambda: stub_regions(server.pid) == [region], 10)
        guard = Guard.start(server.pid)
        time.sleep(1.5)  # the guard scans the group's stubs every second
        guard.close(timeout_s=30)  # the launcher closes its end without stopping the server
        assert server.wait(5) == -signal.SIGTERM
        assert not (SHM_DIR / region).exists()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        (SHM_DIR / region).unlink(missing_ok=True)


def test_launcher_done_after_stopping_its_server_leaves_nothing_to_do(tmp_path: Path) -> None:
    server = subprocess.Popen(["/bin/sleep", "600"], start_new_session=True)
    guard = Guard.start(server.pid)
    server.kill()
    server.wait()
    start = time.monotonic()
    guard.close(timeout_s=30)
    assert time.monotonic() - start < 5
