"""StubWatcher: a stub that dies is noticed, its model unloaded, its /dev/shm leftovers
unlinked and the model loaded again, retried while loading fails. A real process group stands
in for tritonserver (a Python process started under the stub's file name with python_backend's
argument layout) and a real HTTP server for Triton's model-control API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backends.launch.shm_cleanup import SHM_DIR, STUB_NAME, stubs
from backends.launch.stub_watch import ModelControl, StubWatcher


class _ModelControlApi(ThreadingHTTPServer):
    """Records every load/unload call; the first ``failing_loads`` loads answer 400."""

    def __init__(self, failing_loads: int) -> None:
        self.calls: list[str] = []
        self.failing_loads = failing_loads

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:  # noqa: N802, N805 - http.server's names
                api: _ModelControlApi = handler.server  # type: ignore[assignment]
                api.calls.append(handler.path)
                failing = handler.path.endswith("/load") and api.failing_loads > 0
                api.failing_loads -= int(failing)
                body = json.dumps({"error": "load failed: boom"}).encode() if failing else b""
                handler.send_response(400 if failing else 200)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def api() -> Iterator[_ModelControlApi]:
    server = _ModelControlApi(failing_loads=1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _wait(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_a_dead_stub_is_unloaded_cleaned_up_and_loaded_again(tmp_path: Path, api: _ModelControlApi) -> None:
    stub_bin = tmp_path / STUB_NAME
    stub_bin.symlink_to(sys.executable)
    model = tmp_path / "decode" / "1" / "model.py"
    model.parent.mkdir(parents=True)
    model.write_text("import time\ntime.sleep(600)\n")
    region = f"triton_watch_test_{uuid.uuid4().hex}"
    (SHM_DIR / region).write_bytes(b"x")
    group = subprocess.Popen(["/bin/bash", "-c", f"{stub_bin} {model} {region} & sleep 600 & wait"],
                             start_new_session=True)
    pool = SHM_DIR / f"kvb-pool-g{group.pid}-p0-x"
    lines: list[str] = []
    watcher = None
    try:
        assert _wait(lambda: len(stubs(group.pid)) == 1, 10)
        [stub] = stubs(group.pid)
        assert (stub.model, stub.region) == ("decode", region)
        pool = SHM_DIR / f"kvb-pool-g{group.pid}-p{stub.pid}-{uuid.uuid4().hex[:6]}"
        pool.write_bytes(b"x")
        control = ModelControl(f"127.0.0.1:{api.server_address[1]}", load_timeout_s=5, unload_timeout_s=5)
        watcher = StubWatcher(group.pid, control, lambda: True, lines.append, interval_s=0.1, retry_s=0.2)
        os.kill(stub.pid, signal.SIGKILL)
        assert _wait(lambda: len(watcher.recoveries) == 1, 10)  # type: ignore[union-attr]
        assert (SHM_DIR / region).exists() is False and pool.exists() is False
    finally:
        if watcher is not None:
            watcher.close()
        os.killpg(group.pid, signal.SIGKILL)
        group.wait()
        (SHM_DIR / region).unlink(missing_ok=True)
        pool.unlink(missing_ok=True)
    assert api.calls == ["/v2/repository/models/decode/unload", "/v2/repository/models/decode/load",
                         "/v2/repository/models/decode/load"]
    assert lines[:2] == [
        f"triton-pd: the decode model's process (pid {stub.pid}) died; reloading decode (the server "
        "reports not ready until it is back)",
        "triton-pd: loading decode failed (POST /v2/repository/models/decode/load: 400 load failed: "
        "boom); retrying in 0.2 s"]
    assert lines[2].startswith("triton-pd: decode is back after ") and len(lines) == 3
    assert watcher.recoveries[0][0] == "decode"


def test_nothing_is_reloaded_while_the_server_is_not_running(tmp_path: Path, api: _ModelControlApi) -> None:
    stub_bin = tmp_path / STUB_NAME
    stub_bin.symlink_to(sys.executable)
    model = tmp_path / "llm" / "1" / "model.py"
    model.parent.mkdir(parents=True)
    model.write_text("import time\ntime.sleep(600)\n")
    group = subprocess.Popen(["/bin/bash", "-c", f"{stub_bin} {model} r & sleep 600 & wait"],
                             start_new_session=True)
    try:
        assert _wait(lambda: len(stubs(group.pid)) == 1, 10)
        control = ModelControl(f"127.0.0.1:{api.server_address[1]}")
        watcher = StubWatcher(group.pid, control, lambda: False, print, interval_s=0.1)
        os.kill(stubs(group.pid)[0].pid, signal.SIGKILL)
        time.sleep(0.5)
        watcher.close()
    finally:
        os.killpg(group.pid, signal.SIGKILL)
        group.wait()
    assert api.calls == []
