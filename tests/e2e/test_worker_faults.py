"""SIGKILL of a worker's process under ``triton-pd serve`` with requests in flight (issue 8).

One ``serve`` (tiny-llama, 1 prefill + 1 decode, kvbridge master) for the module; the tests
run in file order: the workers' stubs, then the kvbridge master, then the launcher itself. Each fault test checks: every
request in flight ends (here: completes, resumed on the live worker) and its stream moves again
within the orchestrator's bound (worker_silence_s + worker_probe_timeout_s, 2 + 8 s); the
server reports not ready until the launcher has reloaded the model and ready after; later
requests complete and reach the reloaded worker; every KV block is free again; the dead stub's
/dev/shm region and kvbridge pool are gone. The time to recover is printed (pytest -s).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from procs import group_members

from backends.launch.install import find_triton, repo_root
from backends.launch.launcher import free_ports
from backends.launch.shm_cleanup import SHM_DIR, Stub, leftovers, stub_regions, stubs

pytestmark = pytest.mark.e2e
BOUND_S = 2.0 + 8.0  # the orchestrator's default worker_silence_s + worker_probe_timeout_s
NUM_BLOCKS = 512
MAX_TOKENS = 600


@dataclass
class Serve:
    proc: subprocess.Popen[str]
    server_pid: int
    http: int
    grpc: int
    metrics: int
    output: list[str] = field(default_factory=list)


def _start(tmp: Path) -> Serve:
    config = tmp / "deploy.yaml"
    config.write_text(f"model: tiny-llama\nengine: {{num_blocks: {NUM_BLOCKS}, max_model_len: 1024}}\n"
                      "serving: {max_tokens: 1000}\n")
    http, grpc, metrics = free_ports(3)
    (tmp / "tmp").mkdir()  # serve's work directory lands here, even if a teardown has to kill it
    env = {**{k: v for k, v in os.environ.items() if k != "KVBRIDGE_MASTER"}, "TMPDIR": str(tmp / "tmp")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backends.cli", "serve", "--config", str(config), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--ready-timeout", "240"],
        cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    serve = Serve(proc, 0, http, grpc, metrics)
    assert proc.stdout is not None
    for line in proc.stdout:
        serve.output.append(line)
        if "Ctrl-C stops" in line:
            [pid] = re.findall(r"\(tritonserver pid (\d+)\)", line)
            serve.server_pid = int(pid)
            break
    else:
        raise AssertionError("serve exited before it was ready:\n" + "".join(serve.output))
    threading.Thread(target=lambda: serve.output.extend(proc.stdout or ()), daemon=True).start()
    return serve


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    try:
        find_triton()
    except RuntimeError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    served = _start(tmp_path_factory.mktemp("faults"))
    try:
        yield served
    finally:
        if served.proc.poll() is None:
            os.killpg(served.proc.pid, signal.SIGKILL)
            served.proc.wait(30)


class Streams:
    """Streamed greedy ``llm`` requests over one gRPC stream; arrival times per request."""

    def __init__(self, serve: Serve) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.arrivals: dict[str, list[float]] = {}
        self.finals: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.tokens: dict[str, int] = {}
        self._lock = threading.Lock()
        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{serve.grpc}")
        self.client.start_stream(callback=self._on_response)

    def _on_response(self, result: Any, error: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if error is not None:
                self.errors[str(getattr(error, "request_id", "?"))] = str(error)
                return
            response = result.get_response()
            self.arrivals.setdefault(response.id, []).append(now)
            count = result.as_numpy("num_output_tokens")
            if count is not None:
                self.tokens[response.id] = self.tokens.get(response.id, 0) + int(count[0])
            if response.parameters["triton_final_response"].bool_param:
                self.finals[response.id] = now

    def send(self, request_id: str, max_tokens: int = MAX_TOKENS) -> None:
        g = self._grpc
        inputs = [g.InferInput("text_input", [1], "BYTES"), g.InferInput("stream", [1], "BOOL"),
                  g.InferInput("sampling_parameters", [1], "BYTES"),
                  g.InferInput("return_num_output_tokens", [1], "BOOL")]
        inputs[0].set_data_from_numpy(np.array([f"fault test {request_id}: tell me".encode()], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.array([True]))
        sampling = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        inputs[2].set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
        inputs[3].set_data_from_numpy(np.array([True]))
        self.client.async_stream_infer("llm", inputs, request_id=request_id, enable_empty_final_response=True)

    def wait(self, ids: list[str], timeout_s: float, started: int = 0) -> None:
        """Until each of ``ids`` has ``started`` chunks (0: its final response) or an error."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                done = [i for i in ids if i in self.errors or
                        (len(self.arrivals.get(i, ())) >= started if started else i in self.finals)]
            if len(done) == len(ids):
                return
            time.sleep(0.05)
        raise AssertionError(f"not done after {timeout_s} s: {sorted(set(ids) - set(done))}; errors {self.errors}")

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def _stub(serve: Serve, model: str) -> Stub:
    [stub] = [s for s in stubs(serve.server_pid) if s.model == model]
    return stub


def _ready(serve: Serve) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{serve.http}/v2/health/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _metric(serve: Serve, name: str, model: str) -> float:
    text = requests.get(f"http://127.0.0.1:{serve.metrics}/metrics", timeout=10).text
    found = re.findall(rf'^{name}\{{model="{model}"[^}}]*\}} ([\d.e+-]+)$', text, re.MULTILINE)
    return float(found[0]) if found else 0.0


def _kill_and_recover(serve: Serve, model: str, streams: Streams, ids: list[str]) -> tuple[Stub, float, float]:
    """Kills ``model``'s stub; returns it, the longest stall of a stream in flight, and the
    seconds until the server is ready again with a new stub for ``model``."""
    dead = _stub(serve, model)
    killed = time.monotonic()
    os.kill(dead.pid, signal.SIGKILL)
    during = [f"{ids[0]}-during-{j}" for j in range(3)]  # sent to the dead stub, not yet detected
    for request_id in during:
        streams.send(request_id)
    saw_unready = False
    deadline = killed + 120
    while time.monotonic() < deadline:
        ready = _ready(serve)
        saw_unready = saw_unready or not ready
        if ready and saw_unready and any(s.model == model and s.pid != dead.pid for s in stubs(serve.server_pid)):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{model} not back after 120 s:\n" + "".join(serve.output[-20:]))
    recovered_s = time.monotonic() - killed
    streams.wait(ids + during, 120)
    assert min(streams.finals[i] for i in ids) > killed  # all were in flight
    assert {i: streams.tokens.get(i) for i in during} == dict.fromkeys(during, MAX_TOKENS)
    stall = max(max((b - a for a, b in zip(t, t[1:], strict=False) if b > killed), default=0.0)
                for t in (streams.arrivals[i] for i in ids))
    return dead, stall, recovered_s


def _after_recovery(serve: Serve, model: str, dead: Stub, tag: str) -> None:
    """Later requests complete and reach the reloaded ``model``; blocks free; dead stub's shm gone."""
    before = _metric(serve, "nv_inference_request_success", model)
    streams = Streams(serve)
    try:
        for i in range(20):
            streams.send(f"{tag}-after-{i}", max_tokens=8)
            streams.wait([f"{tag}-after-{i}"], 60)
            if _metric(serve, "nv_inference_request_success", model) > before:
                break
            time.sleep(0.5)
    finally:
        streams.close()
    assert streams.errors == {}
    assert _metric(serve, "nv_inference_request_success", model) > before
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        free = {m: _metric(serve, "pd_kv_blocks_free", m) for m in ("prefill", "decode")}
        if free == {"prefill": NUM_BLOCKS, "decode": NUM_BLOCKS}:
            break
        time.sleep(0.2)
    assert free == {"prefill": NUM_BLOCKS, "decode": NUM_BLOCKS}
    assert not (SHM_DIR / dead.region).exists()
    assert list(SHM_DIR.glob(f"kvb-*pool-g{serve.server_pid}-p{dead.pid}-*")) == []


@pytest.mark.parametrize("model", ["decode", "prefill"])
def test_killed_worker_in_flight_requests_end_and_model_comes_back(serve: Serve, model: str) -> None:
    streams = Streams(serve)
    ids = [f"{model}-{i}" for i in range(6)]
    try:
        for request_id in ids:
            streams.send(request_id)
        streams.wait(ids, 60, started=3)
        dead, stall, recovered_s = _kill_and_recover(serve, model, streams, ids)
    finally:
        streams.close()
    print(f"\n{model} SIGKILL: longest stall of an in-flight stream {stall:.1f} s, "
          f"ready again after {recovered_s:.1f} s")
    assert streams.errors == {}
    assert {i: streams.tokens[i] for i in ids} == dict.fromkeys(ids, MAX_TOKENS)
    assert stall < BOUND_S + 5.0  # detection bound, plus a recompute's first step on a loaded box
    assert any(f"triton-pd: {model} is back after" in line for line in serve.output)
    _after_recovery(serve, model, dead, model)


def _master(serve: Serve) -> tuple[int, int]:
    """The pid and port of serve's kvbridge master now (its latest start line)."""
    found = [re.findall(r"kvbridge master \(pid (\d+)\) on 127\.0\.0\.1:(\d+)$", line.strip())
             for line in serve.output]
    pid, port = [f for f in found if f][-1][0]
    return int(pid), int(port)


def _registered(port: int) -> list[str]:
    from kvbridge.master.client import MasterClient

    try:
        with MasterClient("127.0.0.1", port, node_id="e2e-observer", timeout_s=2.0) as client:
            return sorted(n.node_id.partition("/")[2].rpartition("#")[0] for n in client.nodes())
    except OSError:
        return []


def _blocks(port: int) -> dict[str, int]:
    """Per worker model, the blocks the master lists for it."""
    from kvbridge.master.client import MasterClient

    try:
        with MasterClient("127.0.0.1", port, node_id="e2e-observer", timeout_s=2.0) as client:
            return {n.node_id.partition("/")[2].rpartition("#")[0]: n.num_blocks for n in client.nodes()}
    except OSError:
        return {}


def test_killed_master_is_restarted_and_workers_register_again(serve: Serve) -> None:
    pid, port = _master(serve)
    # A reloaded worker's old registration lingers until the master's heartbeat timeout (10 s).
    deadline = time.monotonic() + 30
    while _registered(port) != ["decode", "prefill"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _registered(port) == ["decode", "prefill"]
    streams = Streams(serve)
    ids = [f"master-{i}" for i in range(4)]
    try:
        for request_id in ids:
            streams.send(request_id)
        streams.wait(ids, 60, started=3)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        streams.wait(ids, 120)
    finally:
        streams.close()
    assert streams.errors == {}
    assert {i: streams.tokens[i] for i in ids} == dict.fromkeys(ids, MAX_TOKENS)
    deadline = time.monotonic() + 30
    while _registered(port) != ["decode", "prefill"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _registered(port) == ["decode", "prefill"]
    # and re-published what they hold: the restarted master knows the streams' prompt blocks
    while not all(_blocks(port).get(m, 0) > 0 for m in ("decode", "prefill")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_blocks(port).get(m, 0) > 0 for m in ("decode", "prefill")), _blocks(port)
    new_pid, new_port = _master(serve)
    print(f"\nmaster SIGKILL: both workers registered with the restarted master after "
          f"{time.monotonic() - killed:.1f} s")
    assert new_port == port and new_pid != pid
    assert any(f"kvbridge master (pid {pid}) exited with status -9; restarting it" in line
               for line in serve.output)


def test_killed_launcher_takes_tritonserver_and_its_shared_memory_along(serve: Serve) -> None:
    regions = stub_regions(serve.server_pid)
    assert len(regions) == 4
    master_pid, _ = _master(serve)
    os.kill(serve.proc.pid, signal.SIGKILL)
    serve.proc.wait(10)
    deadline = time.monotonic() + 60
    while (group_members(serve.server_pid) or _alive(master_pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(serve.server_pid) == []
    assert not _alive(master_pid)
    assert leftovers(serve.server_pid, regions) == []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False
