"""A real tritonserver serving a disaggregated deployment (1 prefill + 1 decode, tiny preset),
with a kvbridge master in the test process (or the cluster its ``cluster_env`` names: etcd and
master processes); plus metric and gRPC helpers for its tests.
The session-scoped fixture over it lives in disagg_plugin.py."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backends.launch.deploy import Deployment, write_repository
from backends.launch.install import find_triton
from backends.launch.launcher import LaunchSpec, ServerPorts, TritonServer, free_ports
from backends.launch.layout import layout_backend_dir
from backends.serving.engine_spec import EngineSpec
from kvbridge.master.client import MasterClient
from kvbridge.master.server import MasterConfig, MasterThread

NUM_BLOCKS = 128
MAX_TOKENS = 256


@dataclass(frozen=True, slots=True)
class DisaggServer:
    server: TritonServer
    http_url: str
    grpc_url: str
    metrics_url: str
    master: MasterThread | None  # None: the cluster named by serve_disaggregated's cluster_env

    def master_client(self) -> MasterClient:
        if self.master is None:
            raise RuntimeError("this server's master is not in the test process (cluster_env)")
        host, port = self.master.address
        return MasterClient(host, port, node_id="e2e-observer")


def model_of(node_id: str) -> str:
    """The Triton model of a worker's node id (``<server>/<model>#<pid>``, kv_master)."""
    return node_id.partition("/")[2].rpartition("#")[0]


def _stub_pids(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,pgid,comm"], capture_output=True, text=True, check=True)
    return [int(line.split()[0]) for line in out.stdout.splitlines()[1:]
            if line.split()[1] == str(pgid) and "triton" in line]


def serve_disaggregated(root: Path, model: str = "tiny-llama", master: MasterThread | None = None,
                        cluster_env: tuple[tuple[str, str], ...] = ()) -> Iterator[DisaggServer]:
    """Starts the server (skips when no tritonserver), yields it, stops it; no stub survives.
    Its kvbridge master is ``master`` (another server's: one cluster), else a new one; with
    ``cluster_env`` (KVBRIDGE_MASTER, KVBRIDGE_ETCD, ...) none in this process: the server's
    environment names the cluster."""
    try:
        install = find_triton()
    except RuntimeError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    deployment = Deployment(model=model, disaggregation=True, max_tokens=MAX_TOKENS,
                            engine=EngineSpec(num_blocks=NUM_BLOCKS, max_num_seqs=32, max_model_len=512))
    write_repository(deployment, root / "models")
    backend_dir = layout_backend_dir(install, root / "backends")
    http_port, grpc_port, metrics_port = free_ports(3)
    with contextlib.nullcontext(master) if master is not None or cluster_env else \
            MasterThread(MasterConfig(heartbeat_timeout_s=10.0)) as master:
        env = cluster_env if master is None else (("KVBRIDGE_MASTER", "{}:{}".format(*master.address)),)
        spec = LaunchSpec(install, root / "models", backend_dir, ServerPorts(http_port, grpc_port, metrics_port),
                          extra_env=env)
        server = TritonServer(spec, root / "tritonserver.log")
        server.start()
        pgid = server.pid
        try:
            server.wait_ready(300)
            yield DisaggServer(server, server.http_url, server.grpc_url,
                               f"http://127.0.0.1:{metrics_port}/metrics", master)
        finally:
            server.close()
            assert pgid is not None and _stub_pids(pgid) == []


def metric(served: DisaggServer, name: str, model: str) -> float:
    import requests

    text = requests.get(served.metrics_url, timeout=10).text
    found = re.findall(rf'^{name}\{{model="{model}"\}} ([\d.e+-]+)$', text, re.MULTILINE)
    return float(found[0]) if found else 0.0


def wait_blocks_free(served: DisaggServer, models: tuple[str, ...] = ("prefill", "decode")) -> dict[str, float]:
    deadline = time.monotonic() + 20
    free: dict[str, float] = {}
    while time.monotonic() < deadline:
        free = {m: metric(served, "pd_kv_blocks_free", m) for m in models}
        if all(v == NUM_BLOCKS for v in free.values()):
            break
        time.sleep(0.2)
    return free


Results = queue.Queue[tuple[Any, Any, float]]


def grpc_stream(served: DisaggServer, prompts: list[str], sampling: dict[str, Any]) -> tuple[Any, Results]:
    """Streams each prompt through ``llm``; results carry (result, error, monotonic arrival)."""
    import tritonclient.grpc as grpcclient

    results: Results = queue.Queue()
    client = grpcclient.InferenceServerClient(served.grpc_url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error, time.monotonic())), results))
    for i, prompt in enumerate(prompts):
        inputs = [grpcclient.InferInput("text_input", [1], "BYTES"),
                  grpcclient.InferInput("stream", [1], "BOOL"),
                  grpcclient.InferInput("sampling_parameters", [1], "BYTES"),
                  grpcclient.InferInput("return_num_output_tokens", [1], "BOOL")]
        inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.array([True]))
        inputs[2].set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
        inputs[3].set_data_from_numpy(np.array([True]))
        client.async_stream_infer("llm", inputs, request_id=str(i), enable_empty_final_response=True,
                                  outputs=[grpcclient.InferRequestedOutput("text_output"),
                                           grpcclient.InferRequestedOutput("num_output_tokens")])
    return client, results


def is_final(result: Any) -> bool:
    return bool(result.get_response().parameters["triton_final_response"].bool_param)
