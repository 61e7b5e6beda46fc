"""The pd_worker model (Triton python-based backend; entry: backends/pd_worker/model.py).

Thin: parses the request, hands it to backends.serving.worker.WorkerService (engine thread +
response thread), which answers through the request's response sender (decoupled).
Model parameter ``role``: prefill | decode | both. Engine settings: ``1/engine.yaml``.
Each instance owns a kvbridge node (backends.serving.kv): its KV pool, block server and prefix
store; it registers with the master named by KVBRIDGE_MASTER when one is set. A node that
cannot start (another live node holds its id in etcd) fails ``initialize`` with a message naming
the id, its service and node closed first.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from backends.serving import triton_io
from backends.serving.engine_factory import engine_spec_for, worker_threads
from backends.serving.kv import build_worker, start_worker
from backends.serving.metrics import WorkerMetrics
from backends.serving.pb_lifetimes import Keeper
from backends.serving.worker_io import parse_job


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = triton_io.model_parameters(args)
        role = params.get("role", "both")
        if role not in ("prefill", "decode", "both"):
            raise pb_utils.TritonModelException(f"parameter role must be prefill, decode or both, got {role!r}")
        interval = params.get("stream_interval", "1")
        if not interval.isdigit() or int(interval) < 1:
            raise pb_utils.TritonModelException(f"parameter stream_interval must be a positive integer, "
                                                f"got {interval!r}")
        if not pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"])):
            raise pb_utils.TritonModelException("pd_worker models must be decoupled")
        try:
            spec = engine_spec_for(triton_io.model_dir(args))
            import torch  # this process is the worker's own: its thread budget is ours to set

            torch.set_num_threads(worker_threads(spec))
            engine, self.kv = build_worker(spec, args["model_name"])
            # DuplicateNodeId (a ValueError) closes the service and the node, then lands here
            self.service = start_worker(engine, self.kv, role, int(interval))
        except (ValueError, OSError) as exc:
            raise pb_utils.TritonModelException(f"{args['model_name']}: {exc}") from exc
        self.name = args["model_name"]
        self.keeper = Keeper()  # finished requests, until python_backend lets go (pb_lifetimes.py)
        self.metrics = WorkerMetrics(pb_utils, self.name, lambda: self.service.stats,
                                     lambda: self.kv.cluster_stats)

    def execute(self, requests: list) -> None:
        for request in requests:
            sink = triton_io.TritonSink(pb_utils, request, self.keeper)
            try:
                job = parse_job(triton_io.request_inputs(request),
                                triton_io.request_parameters(request), request.request_id())
            except ValueError as exc:
                sink.fail(exc)
                continue
            self.service.submit(job, sink)
        return None

    def finalize(self) -> None:
        self.metrics.close()
        self.service.close()
        self.kv.close()
        self.keeper.close()
