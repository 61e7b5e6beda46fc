"""The pd_orchestrator model (Triton python-based backend; entry: backends/pd_orchestrator/model.py).

Thin: parses each request (backends.serving.requests) and runs it as its own coroutine in
backends.serving.orchestrator.Orchestrator (async execute; the requests of a batch run together).
Decoupled (the default deployment): responses go out through each request's sender and
``execute`` returns at once, so requests never serialize. Not decoupled (deployment
``serving.decoupled: false``): ``execute`` returns one response per request, in request order,
each the full result or that request's own error; the stub waits for it before the next batch
(``ensemble`` is dynamically batched so waiting requests join the next batch together).
Model parameters: api (llm | ensemble), source, max_tokens, max_model_len, disaggregation
(on | off), prefill_models and decode_models (comma-separated worker model names),
worker_silence_s and worker_probe_timeout_s (worker_health.HealthConfig: a request on a worker
that died learns it within their sum; defaults 2 and 8).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import triton_python_backend_utils as pb_utils

from backends.serving import triton_io
from backends.serving.bls import BlsWorkers, TritonChannel, TritonReply
from backends.serving.kv_cluster import ClusterView
from backends.serving.metrics import RequestMetrics
from backends.serving.orchestrator import Orchestrator
from backends.serving.pb_lifetimes import Keeper
from backends.serving.requests import Limits, parse_ensemble, parse_llm
from backends.serving.supervisor import ClusterSnapshot, Supervisor
from backends.serving.tokenizers import load_tokenizer
from backends.serving.worker_health import HealthConfig, WorkerHealth

LOG = logging.getLogger(__name__)


def _names(value: str) -> list[str]:
    return [n for n in value.split(",") if n]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        p = triton_io.model_parameters(args)
        try:
            self.api = p.get("api", "llm")
            if self.api not in ("llm", "ensemble"):
                raise ValueError(f"parameter api must be llm or ensemble, got {self.api!r}")
            self.limits = Limits(max_tokens=int(p.get("max_tokens", "1024")))
            supervisor = Supervisor(_names(p.get("prefill_models", "")), _names(p.get("decode_models", "")),
                                    p.get("disaggregation", "off") == "on")
            tokenizer = load_tokenizer(p.get("source", "tiny-llama"))
            health_config = HealthConfig(float(p.get("worker_silence_s", "2")),
                                         float(p.get("worker_probe_timeout_s", "8")))
            lookup_s = int(p.get("cluster_lookup_ms", "100")) / 1000
            stall_s = float(p.get("worker_stall_s", "60"))
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{args['model_name']}: {exc}") from exc
        self.block_size = int(p.get("block_size", "16"))
        self.name = args["model_name"]
        self.decoupled = triton_io.is_decoupled(pb_utils, args)
        self.keeper = Keeper()  # finished BLS iterators and requests, until python_backend lets go
        self.workers = BlsWorkers(pb_utils, self.keeper)
        # disagg hook (owner of kv*.py): plan with the kvbridge master's prefix hits and loads when one is set
        self.cluster = ClusterView.from_env(p.get("source", "tiny-llama"), self.block_size, lookup_s)
        self.health = WorkerHealth(self.workers.cancel, health_config, on_change=supervisor.set_down)
        self.metrics = RequestMetrics(pb_utils, args["model_name"])
        self.orchestrator = Orchestrator(tokenizer, supervisor, self.workers, int(p.get("max_model_len", "1024")),
                                         self._lookup if self.cluster is not None else None,
                                         health=self.health, stall_s=stall_s)
        self.tasks: set[asyncio.Task[None]] = set()

    async def _lookup(self, prompt_ids: Sequence[int]) -> ClusterSnapshot | None:
        """The cluster view's snapshot within its deadline, counted answered or missed."""
        assert self.cluster is not None
        snapshot = await self.cluster.within(prompt_ids)
        self.metrics.lookup(snapshot is not None)
        return snapshot

    async def execute(self, requests: list) -> list | None:
        if self.decoupled:
            await asyncio.gather(*(self._serve(r, TritonChannel(pb_utils, r, None, self.block_size, self.keeper))
                                   for r in requests))
            return None
        replies = [TritonReply(pb_utils, r, None, self.block_size, self.keeper) for r in requests]
        await asyncio.gather(*(self._serve(r, c) for r, c in zip(requests, replies, strict=True)))
        self.keeper.hold(*requests)  # the stub drops them once it has sent these responses
        return [self._response(c) for c in replies]

    def _response(self, reply: TritonReply) -> object:
        if reply.response is None:  # _serve always answers; never leave Triton without a response
            reply.fail(RuntimeError(f"{self.name}: the request ended without a response"))
        return reply.response

    async def _serve(self, request: object, channel: TritonChannel | TritonReply) -> None:
        try:
            inputs = triton_io.request_inputs(request)
            parse = parse_llm if self.api == "llm" else parse_ensemble
            channel.req = parse(inputs, self.limits)
            if channel.req.stream and not self.decoupled:
                raise ValueError(f"stream: true needs a decoupled model; {self.name} is deployed with "
                                 "serving.decoupled: false (send stream=false, or deploy it decoupled)")
            timing = await self.orchestrator.handle(channel.req, channel)
            self.metrics.observe(timing)
        except Exception as exc:  # one bad request gets its own error; the rest keep going
            if not isinstance(exc, ValueError):
                LOG.warning("request failed: %r", exc)
            try:
                channel.fail(exc)
            except Exception:  # the client is gone (cancelled): nothing left to tell it
                LOG.info("could not deliver the error of a finished request: %r", exc)

    def finalize(self) -> None:
        self.workers.close()
        self.keeper.close()
        self.metrics.close()
        if self.cluster is not None:
            self.cluster.close()
