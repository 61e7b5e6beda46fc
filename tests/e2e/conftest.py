"""One real tritonserver per test session, serving colocated deployments of both tiny presets.

``llm`` / ``ensemble`` / ``worker`` serve tiny-llama; ``mla_llm`` / ``mla_ensemble`` /
``mla_worker`` serve tiny-mla (one server for both: a second one would cost its start-up time).

The server runs from the pytriton wheel (or a system install), on free loopback ports, with a
backend directory laid out in a temp dir; teardown stops it and checks that every model
unloaded cleanly: no stub survives and no stub's /dev/shm region is left behind (python_backend
only removes it when its stub finalizes; a stub the server had to SIGKILL leaves it).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from backends.launch.deploy import Deployment, write_repository
from backends.launch.install import find_triton
from backends.launch.launcher import LaunchSpec, ServerPorts, TritonServer, free_ports
from backends.launch.layout import layout_backend_dir
from backends.serving.engine_spec import EngineSpec

NUM_BLOCKS = 128
MAX_TOKENS = 256
# Every worker of the served repository and its pool size (what "all blocks free" means).
WORKERS = {"worker": NUM_BLOCKS, "mla_worker": NUM_BLOCKS}


@dataclass(frozen=True, slots=True)
class Served:
    server: TritonServer
    http_url: str
    grpc_url: str
    metrics_url: str
    num_blocks: int


def _stub_pids(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,pgid,comm"], capture_output=True, text=True, check=True)
    return [int(line.split()[0]) for line in out.stdout.splitlines()[1:]
            if line.split()[1] == str(pgid) and "triton" in line]


def _shm_regions(pids: list[int]) -> list[str]:
    """The /dev/shm region of each stub: its command line's second argument."""
    regions = []
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if len(argv) > 2 and argv[2].startswith(b"triton_"):
            regions.append(argv[2].decode())
    return sorted(regions)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    try:
        install = find_triton()
    except RuntimeError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    root = tmp_path_factory.mktemp("triton")
    engine = EngineSpec(num_blocks=NUM_BLOCKS, max_num_seqs=32, max_model_len=512)
    write_repository(Deployment(model="tiny-llama", disaggregation=False, max_tokens=MAX_TOKENS, engine=engine), root / "models")
    mla = Deployment(model="tiny-mla", disaggregation=False, max_tokens=MAX_TOKENS, prefix="mla_",
                     engine=replace(engine, source="tiny-mla"))
    write_repository(mla, root / "models")
    backend_dir = layout_backend_dir(install, root / "backends")
    http_port, grpc_port, metrics_port = free_ports(3)
    spec = LaunchSpec(install, root / "models", backend_dir, ServerPorts(http_port, grpc_port, metrics_port))
    server = TritonServer(spec, root / "tritonserver.log")
    server.start()
    pgid = server.pid
    try:
        server.wait_ready(300)
        yield Served(server, server.http_url, server.grpc_url, f"http://127.0.0.1:{metrics_port}/metrics",
                     NUM_BLOCKS)
    finally:
        regions = _shm_regions(_stub_pids(pgid)) if pgid is not None else []
        server.close()
        assert pgid is not None and _stub_pids(pgid) == []
    assert len(regions) == 3 * len(WORKERS)  # the llm, ensemble and worker stubs of each preset
    assert [r for r in regions if Path("/dev/shm", r).exists()] == []
