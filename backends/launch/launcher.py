"""Starting and stopping one tritonserver process (and, with it, every Python backend stub).

The server runs in its own process group (``start_new_session``), so ``stop()`` can signal
the server and every ``triton_python_backend_stub`` it spawned: SIGTERM to the group, wait
for the grace period, then SIGKILL to the group. Every wait has a deadline.
With ``LaunchSpec.die_with_parent`` (``triton-pd serve``) the server gets SIGTERM from the
kernel when the thread that started it exits (PR_SET_PDEATHSIG), so a launcher that is killed,
SIGKILL included, never leaves a serving tritonserver behind; the stubs follow their server.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from backends.launch.install import TritonInstall, python_lib_dir, repo_root
from backends.launch.shm_cleanup import stub_regions, unlink_leftovers


@dataclass(frozen=True, slots=True)
class ServerPorts:
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything one tritonserver run needs; ``extra_args`` go last on the command line."""

    install: TritonInstall
    model_repository: Path
    backend_dir: Path
    ports: ServerPorts = ServerPorts()
    log_verbose: int = 0
    extra_env: tuple[tuple[str, str], ...] = ()
    extra_args: tuple[str, ...] = field(default=())
    die_with_parent: bool = False


def free_ports(count: int, address: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free right now on ``address`` (racy by nature, like every such helper)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((address, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def server_command(spec: LaunchSpec) -> list[str]:
    p = spec.ports
    return [
        str(spec.install.server_bin),
        f"--model-repository={spec.model_repository}",
        f"--backend-directory={spec.backend_dir}",
        f"--http-address={p.address}", f"--http-port={p.http_port}",
        f"--grpc-address={p.address}", f"--grpc-port={p.grpc_port}",
        f"--metrics-address={p.address}", f"--metrics-port={p.metrics_port}",
        "--allow-gpu-metrics=false",
        "--exit-timeout-secs=5",
        f"--log-verbose={spec.log_verbose}",
        *spec.extra_args,
    ]


def server_env(spec: LaunchSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server and its stubs: libraries, this Python, this checkout."""
    env = dict(os.environ if base is None else base)
    lib_dirs = [str(d) for d in spec.install.lib_dirs]
    pylib = python_lib_dir()
    if pylib is not None:
        lib_dirs.insert(0, str(pylib))  # the stub must embed this interpreter's libpython
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(lib_dirs)
    # The embedded interpreter derives sys.prefix from the first python3 on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    paths = [str(repo_root())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = ":".join(paths)
    env.update(dict(spec.extra_env))
    return env


class TritonServer:
    """Owns one tritonserver process group. ``close()`` is idempotent."""

    def __init__(self, spec: LaunchSpec, log_path: Path | None = None) -> None:
        self.spec = spec
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{self.spec.ports.address}:{self.spec.ports.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.spec.ports.address}:{self.spec.ports.grpc_port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("tritonserver already started")
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            server_command(self.spec), env=server_env(self.spec), start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            preexec_fn=parent_death_signal(os.getpid()) if self.spec.die_with_parent else None)

    def poll(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def is_ready(self) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Blocks until /v2/health/ready is 200; RuntimeError if the server exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.poll()
            if code is not None:
                raise RuntimeError(f"tritonserver exited with code {code} before ready{self._log_hint()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f}s{self._log_hint()}")

    def _log_hint(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace")[-4000:]
        return f"; log {self.log_path} ends with:\n{tail}"

    def close(self, grace_s: float = 15.0) -> None:
        """SIGTERM the server, wait up to ``grace_s``, then SIGKILL its whole process group."""
        proc, self._proc = self._proc, None
        if proc is not None:
            regions = stub_regions(proc.pid)
            # SIGTERM the server only: it unloads models and stops its stubs itself.
            _signal_pid(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10.0)
            # Stubs whose parent died still carry the group id: make sure none survives.
            _signal_group(proc.pid, signal.SIGKILL)
            if _wait_group_gone(proc.pid, timeout_s=10.0):
                unlink_leftovers(proc.pid, regions)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PR_SET_PDEATHSIG = 1


def parent_death_signal(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when the thread that forked it exits, and exits
    at once if its parent is already gone. prctl is looked up before the fork."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _signal_pid(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Waits until no process of group ``pgid`` is left (killpg(0) probes without signalling);
    False if some is still there at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return True
        time.sleep(0.05)
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
