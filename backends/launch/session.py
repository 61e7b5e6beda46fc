"""Running one tritonserver for a model repository on free loopback ports, as a context manager.

Used by ``triton-pd demo``, the serving benchmark and tests: it finds tritonserver, lays out the
backend directory under ``work``, starts the server (log in ``work/tritonserver.log``), waits for
readiness and, on exit, stops the server and every stub it started (TritonServer.close).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from backends.launch.deploy import Deployment, write_repository
from backends.launch.install import find_triton, repo_root
from backends.launch.launcher import LaunchSpec, ServerPorts, TritonServer, free_ports
from backends.launch.layout import layout_backend_dir
from backends.launch.startup import Note, ServerLog, prepare_sources, repository_plan, wait_ready


@dataclass(frozen=True, slots=True)
class Repository:
    """A model repository and a one-line description of what it deploys."""

    path: Path
    description: str


def disaggregation_available() -> bool:
    """True once the kvbridge prefill→decode path (``backends.serving.kv``) is installed."""
    return importlib.util.find_spec("backends.serving.kv") is not None


def default_repository(work: Path) -> Repository:
    """The shipped ``model_repository/`` (1 prefill + 1 decode) when disaggregation works;
    otherwise a colocated repository with the same engine settings, written under ``work``."""
    if disaggregation_available():
        return Repository(repo_root() / "model_repository", "disaggregated: 1 prefill + 1 decode worker")
    fallback = colocated_repository(work / "colocated", Deployment(disaggregation=False))
    return Repository(fallback.path, f"{fallback.description}; fallback: the kvbridge "
                      "prefill->decode path (backends/serving/kv.py) is not installed")


def colocated_repository(dest: Path, deployment: Deployment) -> Repository:
    """``deployment`` (disaggregation off) written under ``dest``."""
    if deployment.disaggregation:
        raise ValueError("deployment.disaggregation: a colocated repository needs it off, got True")
    write_repository(deployment, dest)
    return Repository(dest, f"colocated, {deployment.decode.count} worker(s) with role both")


@contextmanager
def _kvbridge_master() -> Iterator[None]:
    """A loopback kvbridge master (as ``triton-pd serve`` starts) unless KVBRIDGE_MASTER names one;
    the variable is restored on exit, so a later server does not inherit a closed master."""
    from backends.serving.kv_master import MASTER_ENV, start_master_if_needed

    before = os.environ.get(MASTER_ENV)
    master = start_master_if_needed()
    try:
        yield
    finally:
        if master is not None:
            master.close()
            if before is None:
                os.environ.pop(MASTER_ENV, None)
            else:
                os.environ[MASTER_ENV] = before


@contextmanager
def running_server(repo: Path, work: Path, ready_timeout_s: float = 600.0,
                   note: Note | None = None) -> Iterator[TritonServer]:
    """A ready tritonserver serving ``repo`` (with a kvbridge master when the kvbridge path is
    installed); stopped, stubs and master included, when the block exits. With ``note``, the
    models are prepared first and loading is reported through it (startup.wait_ready; a failed
    start is a one-line StartupError)."""
    plan = None
    if note is not None:
        plan = repository_plan(repo)
        prepare_sources(plan.sources, note)
    install = find_triton()
    work.mkdir(parents=True, exist_ok=True)
    backend_dir = layout_backend_dir(install, work / "backends")
    http_port, grpc_port, metrics_port = free_ports(3)
    spec = LaunchSpec(install, repo, backend_dir, ServerPorts(http_port, grpc_port, metrics_port))
    server = TritonServer(spec, work / "tritonserver.log")
    with _kvbridge_master() if disaggregation_available() else nullcontext():
        try:
            server.start()
            if note is None or plan is None:
                server.wait_ready(ready_timeout_s)
            else:
                wait_ready(server, ServerLog(work / "tritonserver.log"), plan, ready_timeout_s, note)
            yield server
        finally:
            server.close()
