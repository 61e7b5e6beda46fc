"""``triton-pd serve`` as a user runs it: serves until Ctrl-C (SIGINT) or SIGTERM, then stops
tritonserver, every stub process and the kvbridge master it started."""

from __future__ import annotations

import glob
import itertools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from procs import group_members

from backends.launch.client import StreamingClient
from backends.launch.install import find_triton, repo_root
from backends.launch.launcher import free_ports
from backends.launch.shm_cleanup import leftovers, stub_regions

pytestmark = pytest.mark.e2e


def _read_until_ready(proc: subprocess.Popen[str]) -> str:
    """serve's output up to its ready line (the rest is read by communicate())."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C stops" in line:
            return "".join(lines)
    raise AssertionError("serve exited before it was ready:\n" + "".join(lines))


def _ignore_sigint() -> None:
    """As a non-interactive shell starts a background job: SIGINT ignored on entry."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_everything_on_signal(signum: signal.Signals, tmp_path: Path) -> None:
    """A client keeps its HTTP keep-alive connection open across the shutdown: tritonserver
    then spends its exit timeout waiting for it and kills the stubs unfinalized; the launcher
    must still leave no process and no shared memory behind."""
    try:
        find_triton()
    except RuntimeError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    http, grpc, metrics = free_ports(3)
    env = _private_tmp(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "backends.cli", "serve", "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--ready-timeout", "240"],
        cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=_ignore_sigint)
    try:
        [server_pid] = re.findall(r"\(tritonserver pid (\d+)\)", _read_until_ready(proc))
        regions = stub_regions(int(server_pid))
        assert len(regions) == 4  # llm, ensemble, prefill, decode
        body = {"text_input": "hi", "sampling_parameters": '{"max_tokens": 2, "temperature": 0}'}
        with requests.Session() as client:
            reply = client.post(f"http://127.0.0.1:{http}/v2/models/llm/generate", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            proc.send_signal(signum)
            output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output
    _assert_nothing_left(proc, int(server_pid), regions, env["TMPDIR"])


def _private_tmp(tmp_path: Path) -> dict[str, str]:
    """serve's environment: no master of ours, and a temporary directory of its own (TMPDIR),
    so its work directory is checked there, not among other runs' in the shared /tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**{k: v for k, v in os.environ.items() if k != "KVBRIDGE_MASTER"}, "TMPDIR": str(tmp)}


def _assert_nothing_left(proc: subprocess.Popen[str], server_pid: int, regions: list[str], tmp: str) -> None:
    """No process of serve or tritonserver, no stub shared memory, no work directory left in
    serve's own temporary directory."""
    assert group_members(server_pid) == []
    assert group_members(proc.pid) == []
    assert leftovers(server_pid, regions) == []
    assert glob.glob(os.path.join(tmp, "triton-pd-*")) == []  # serve's temporary directory is gone


def test_serve_reports_a_dead_tritonserver(tmp_path: Path) -> None:
    """serve with a deployment file streams as it says (``serving.stream_interval: 4``: after
    the first, tokens arrive at least four per response); then tritonserver killed under it:
    serve says so, exits 1, and leaves nothing behind."""
    try:
        find_triton()
    except RuntimeError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    config = tmp_path / "deploy.yaml"
    config.write_text("model: tiny-llama\nserving: {stream_interval: 4}\n")
    http, grpc, metrics = free_ports(3)
    env = _private_tmp(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "backends.cli", "serve", "--config", str(config), "--http-port",
         str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
         "--ready-timeout", "240"],
        cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        [server_pid] = re.findall(r"\(tritonserver pid (\d+)\)", _read_until_ready(proc))
        regions = stub_regions(int(server_pid))
        with StreamingClient(f"127.0.0.1:{grpc}") as client:
            result = client.generate("stream me", 25, ignore_eos=True)
        per_response = [len(list(g)) for _, g in itertools.groupby(result.token_times)]
        assert sum(per_response) == 25
        # the first text may wait for printable bytes; every later response but the last holds 4
        assert all(n >= 4 for n in per_response[1:-1]), per_response
        os.kill(int(server_pid), signal.SIGKILL)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, output
    assert f"tritonserver (pid {server_pid}) exited with status -9" in output
    _assert_nothing_left(proc, int(server_pid), regions, env["TMPDIR"])
