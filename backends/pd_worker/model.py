"""Triton python-based backend ``pd_worker``: one LLMEngine per model instance.

Thin: parses the request, hands it to backends.serving.worker.WorkerService (engine thread +
response thread), which answers through the request's response sender (decoupled).
Model parameter ``role``: prefill | decode | both. Engine settings: ``1/engine.yaml``.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from backends.serving import triton_io
from backends.serving.engine_factory import build_engine, engine_spec_for
from backends.serving.metrics import WorkerMetrics
from backends.serving.worker import WorkerService
from backends.serving.worker_io import parse_job


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = triton_io.model_parameters(args)
        role = params.get("role", "both")
        if role not in ("prefill", "decode", "both"):
            raise pb_utils.TritonModelException(f"parameter role must be prefill, decode or both, got {role!r}")
        if not pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"])):
            raise pb_utils.TritonModelException("pd_worker models must be decoupled")
        try:
            engine = build_engine(engine_spec_for(triton_io.model_dir(args)))
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{args['model_name']}: {exc}") from exc
        kv = None
        try:
            from backends.serving.kv import make_transfer
            kv = make_transfer(engine, args["model_name"], role)
        except ImportError:
            pass
        self.name = args["model_name"]
        self.service = WorkerService(engine, role, kv)
        self.metrics = WorkerMetrics(pb_utils, self.name, lambda: self.service.stats)

    def execute(self, requests: list) -> None:
        for request in requests:
            sink = triton_io.TritonSink(pb_utils, request)
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
