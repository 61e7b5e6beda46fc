"""YAML deployments → a model repository (and the per-model ``1/engine.yaml``).

A deployment file (every key optional; unknown, missing-value or invalid keys raise ValueError
naming the key path)::

    model: smollm2-135m-instruct # preset, packaged model, .gguf file or HF checkpoint directory
    disaggregation: true         # false: colocated workers with role "both"
    prefill: {count: 1, devices: [cpu]}
    decode: {count: 1, devices: [cpu]}
    engine: {backend: torch, block_size: 16, num_blocks: 512, max_num_seqs: 32,
             max_num_batched_tokens: 1024, max_model_len: 1024, dtype: float32}
    serving: {max_tokens: 1024, prefix: "", decoupled: true, stream_interval: 1,
              cluster_lookup_ms: 100}

Models generated: ``<prefix>llm`` and ``<prefix>ensemble`` (pd_orchestrator), and workers
``<prefix>prefill[_i]`` / ``<prefix>decode[_i]`` (disaggregated) or ``<prefix>worker[_i]``.
``serving.decoupled`` is tensorrtllm_backend's ``decoupled_mode``: true (default) makes the
public models decoupled (streaming; Triton refuses HTTP ``/infer`` for them); false makes them
answer one response per request (HTTP and gRPC ``infer``; ``stream=true`` is INVALID_ARG).
Workers are decoupled either way (the orchestrator streams from them over BLS).
``serving.stream_interval`` is vLLM's ``stream_interval``: N > 1 sends a request's first token at
once and then its tokens N at a time (fewer responses through every hop at high load; TPOT as
seen by the client gets burstier). Updates that are ready together are merged at any setting.
``engine.backend`` picks the workers' engine: ``torch`` (default; the paged-attention PyTorch
engine) or ``tensorrt_llm`` (TensorRT-LLM's LLM API: needs the tensorrt_llm package, CUDA devices
in every pool and an HF checkpoint directory as the model; refused at parse time otherwise).
``serving.cluster_lookup_ms`` bounds how long a request waits for the kvbridge master's prefix
lookup before it is planned from the local view (kv_cluster.ClusterView.within).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from backends.engine.sources import DEFAULT_MODEL
from backends.serving import specs
from backends.serving.engine_spec import (
    EngineSpec,
    check_keys,
    check_trtllm_target,
    engine_spec_yaml,
    parse_engine_spec,
    typed,
)


@dataclass(frozen=True, slots=True)
class Pool:
    count: int = 1
    devices: tuple[str, ...] = ("cpu",)


@dataclass(frozen=True, slots=True)
class Deployment:
    model: str = DEFAULT_MODEL
    disaggregation: bool = True
    prefill: Pool = Pool()
    decode: Pool = Pool()
    engine: EngineSpec = EngineSpec()
    max_tokens: int = 1024
    prefix: str = ""
    decoupled: bool = True
    stream_interval: int = 1
    cluster_lookup_ms: int = 100


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
_PREFIX = re.compile(r"[A-Za-z0-9_-]*")


def _mapping(data: Any, where: str) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    return data


def _pool(data: Any, where: str) -> Pool:
    if data is None:
        raise ValueError(f"{where}: expected a mapping, got None")
    data = _mapping(data, where)
    check_keys(data, {"count", "devices"}, where + ".")
    count = typed(data.get("count", 1), int, where + ".count")
    devices = data.get("devices", ["cpu"])
    if not isinstance(devices, list) or not devices or not all(isinstance(d, str) for d in devices):
        raise ValueError(f"{where}.devices: expected a non-empty list of device names, got {devices!r}")
    for device in devices:
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"{where}.devices: expected cpu, cuda or cuda:N, got {device!r}")
    return Pool(count, tuple(devices))


def _check_model(model: str) -> str:
    from backends.engine.sources import resolve_source  # imports torch: only when parsing

    resolve_source(model, field="model")
    return model


def parse_deployment(data: Mapping[str, Any]) -> Deployment:
    """A Deployment from parsed YAML; ValueError names the first bad key."""
    if not isinstance(data, Mapping):
        raise ValueError(f"deployment: expected a mapping at the top level, got {type(data).__name__}")
    check_keys(data, {"model", "disaggregation", "prefill", "decode", "engine", "serving"}, "")
    serving = _mapping(data.get("serving"), "serving")
    check_keys(serving, {"max_tokens", "prefix", "decoupled", "stream_interval", "cluster_lookup_ms"}, "serving.")
    engine_data = _mapping(data.get("engine"), "engine")
    # The model and the devices are set at the top level and per pool, never per engine;
    # host_workers is counted from the pools.
    check_keys(engine_data, {f.name for f in fields(EngineSpec)} - {"source", "device",
                                                                    "host_workers"}, "engine.")
    model = _check_model(typed(data.get("model", DEFAULT_MODEL), str, "model"))
    prefix = typed(serving.get("prefix", ""), str, "serving.prefix")
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"serving.prefix: expected letters, digits, '_' or '-', got {prefix!r}")
    engine = parse_engine_spec({"source": model, **engine_data})
    prefill, decode = _pool(data.get("prefill", {}), "prefill"), _pool(data.get("decode", {}), "decode")
    if engine.backend == "tensorrt_llm":
        check_trtllm_target(model, {"prefill.devices": prefill.devices, "decode.devices": decode.devices})
    max_tokens = typed(serving.get("max_tokens", 1024), int, "serving.max_tokens")
    if max_tokens > engine.max_model_len:
        raise ValueError(f"serving.max_tokens: must be <= engine.max_model_len={engine.max_model_len}, "
                         f"got {max_tokens}")
    return Deployment(
        model=model, disaggregation=typed(data.get("disaggregation", True), bool, "disaggregation"),
        prefill=prefill, decode=decode,
        engine=engine, max_tokens=max_tokens, prefix=prefix,
        decoupled=typed(serving.get("decoupled", True), bool, "serving.decoupled"),
        stream_interval=typed(serving.get("stream_interval", 1), int, "serving.stream_interval"),
        cluster_lookup_ms=typed(serving.get("cluster_lookup_ms", 100), int, "serving.cluster_lookup_ms"))


def load_deployment(path: str | Path) -> Deployment:
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    return parse_deployment(data)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line: the problem, its context and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    if context:
        problem = f"{context}: {problem}"
    mark = getattr(exc, "problem_mark", None)
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _names(prefix: str, base: str, count: int) -> list[str]:
    return [f"{prefix}{base}" if i == 0 else f"{prefix}{base}_{i}" for i in range(count)]


def _worker_specs(dep: Deployment) -> list[tuple[specs.ModelSpec, EngineSpec]]:
    pools = [("prefill", dep.prefill), ("decode", dep.decode)] if dep.disaggregation else \
        [("both", Pool(dep.decode.count, dep.decode.devices))]
    out = []
    host_workers = sum(pool.count for _, pool in pools)
    for role, pool in pools:
        base = "worker" if role == "both" else role
        for i, name in enumerate(_names(dep.prefix, base, pool.count)):
            engine = EngineSpec(**{f.name: getattr(dep.engine, f.name) for f in fields(EngineSpec)}
                                | {"device": pool.devices[i % len(pool.devices)],
                                   "source": dep.model, "host_workers": host_workers})
            params = {"role": role, "stream_interval": str(dep.stream_interval)}
            out.append((specs.ModelSpec(name, "pd_worker", 0, specs.WORKER_INPUTS, specs.WORKER_OUTPUTS,
                                        params), engine))
    return out


def model_specs(dep: Deployment) -> list[tuple[specs.ModelSpec, EngineSpec | None]]:
    """Every model of the deployment with its engine spec (None for orchestrators)."""
    workers = _worker_specs(dep)
    by_role = {r: ",".join(s.name for s, _ in workers if s.parameters["role"] == r)
               for r in ("prefill", "decode", "both")}
    common = {"source": dep.model, "max_tokens": str(dep.max_tokens),
              "max_model_len": str(dep.engine.max_model_len),
              "cluster_lookup_ms": str(dep.cluster_lookup_ms),
              "block_size": str(dep.engine.block_size),
              "disaggregation": "on" if dep.disaggregation else "off",
              "prefill_models": by_role["prefill"],
              "decode_models": by_role["decode"] or by_role["both"]}
    public: list[tuple[specs.ModelSpec, EngineSpec | None]] = [
        (specs.ModelSpec(f"{dep.prefix}llm", "pd_orchestrator", 0, specs.LLM_INPUTS,
                         specs.LLM_OUTPUTS, {**common, "api": "llm"}, decoupled=dep.decoupled), None),
        (specs.ModelSpec(f"{dep.prefix}ensemble", "pd_orchestrator", 64, specs.ENSEMBLE_INPUTS,
                         specs.ENSEMBLE_OUTPUTS, {**common, "api": "ensemble"}, decoupled=dep.decoupled),
         None)]
    return public + [(s, e) for s, e in workers]


def write_repository(dep: Deployment, dest: str | Path) -> list[str]:
    """Write every model's config.pbtxt (and 1/engine.yaml) under ``dest``; returns model names."""
    root = Path(dest)
    names = []
    for spec, engine in model_specs(dep):
        version = root / spec.name / "1"
        version.mkdir(parents=True, exist_ok=True)
        (root / spec.name / "config.pbtxt").write_text(specs.render_config(spec))
        if engine is not None:
            (version / "engine.yaml").write_text(engine_spec_yaml(engine))
        else:
            (version / ".keep").write_text("")
        names.append(spec.name)
    return names
