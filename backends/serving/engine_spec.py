"""A worker's ``1/engine.yaml``: the EngineSpec dataclass and its YAML form, both directions.

The launch side writes the file (backends/launch/deploy.py, from a deployment); the worker
reads it inside tritonserver (engine_factory.py). Both go through this module, so the file's
keys, defaults and checks live in one place and the worker imports no launch tool.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from backends.engine.sources import DEFAULT_MODEL

# engine.backend -> the package it needs (None: always there). "torch" is the paged-attention
# PyTorch engine (backends/engine/engine.py); "tensorrt_llm" TensorRT-LLM's LLM API through
# backends/engine/trtllm.py (GPU only; an HF checkpoint directory as the model).
BACKENDS: dict[str, str | None] = {"torch": None, "tensorrt_llm": "tensorrt_llm"}


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What ``1/engine.yaml`` holds: the model source and the EngineConfig fields we expose."""

    source: str = DEFAULT_MODEL
    backend: str = "torch"  # a key of BACKENDS
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int = 512
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    max_model_len: int = 1024
    dtype: str = "float32"
    # torch intra-op threads of the worker process; 0: this host's CPUs shared by host_workers
    # worker processes plus one share for tritonserver and the orchestrator (worker_threads)
    threads: int = 0
    host_workers: int = 1


def check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    """ValueError naming ``where + key`` for the first key of ``data`` not in ``allowed``."""
    for key in data:
        if key not in allowed:
            raise ValueError(f"{where}{key}: unknown key (expected one of {sorted(allowed)})")


def typed(value: Any, kind: type, path: str) -> Any:
    """``value`` if it is a ``kind`` (int: a positive one), else ValueError naming ``path``."""
    if value is None:
        raise ValueError(f"{path}: missing value")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{path}: expected a positive integer, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{path}: expected true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{path}: expected a string, got {value!r}")
    return value


def parse_engine_spec(data: Mapping[str, Any], where: str = "engine.") -> EngineSpec:
    """An EngineSpec from parsed YAML; ValueError names ``where`` + the first bad key."""
    names = {f.name: f for f in fields(EngineSpec)}
    check_keys(data, set(names), where)
    threads = data.get("threads", 0)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"{where}threads: expected 0 (automatic) or a positive integer, "
                         f"got {threads!r}")
    values = {k: typed(v, type(getattr(EngineSpec(), k)), where + k) for k, v in data.items()
              if k != "threads"}
    values["threads"] = threads
    if values.get("dtype", "float32") not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"{where}dtype: expected float32, float16 or bfloat16, got {values['dtype']!r}")
    check_backend(values.get("backend", "torch"), where)
    return EngineSpec(**values)


def check_backend(backend: str, where: str = "engine.") -> None:
    """ValueError naming ``where + "backend"`` for an unknown backend, or for one whose package
    is not installed here (found by spec: nothing is imported; the engine factory's real import
    may still fail, e.g. without CUDA libraries, and says so then)."""
    if backend not in BACKENDS:
        raise ValueError(f"{where}backend: expected one of {sorted(BACKENDS)}, got {backend!r}")
    package = BACKENDS[backend]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"{where}backend: {backend!r} needs the {package} package, which is not installed")


def load_engine_spec(path: str | Path) -> EngineSpec:
    """The EngineSpec in the YAML file ``path``; ValueError names the file and the bad key."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping")
    return parse_engine_spec(data, where=f"{path}: ")


def engine_spec_yaml(spec: EngineSpec) -> str:
    """``spec`` as the text of an ``engine.yaml`` (every field, in declaration order)."""
    return yaml.safe_dump({f.name: getattr(spec, f.name) for f in fields(EngineSpec)},
                          sort_keys=False)


def check_trtllm_target(source: str, devices: Mapping[str, Sequence[str]]) -> None:
    """What TensorRT-LLM workers need besides the package: every device CUDA (``devices``: the
    field naming them -> the devices) and ``source`` an HF checkpoint directory. ValueError
    naming the field otherwise (resolving the source imports torch)."""
    from backends.engine.sources import SourceKind, resolve_source

    for field, names in devices.items():
        for device in names:
            if not device.startswith("cuda"):
                raise ValueError(f"{field}: engine.backend 'tensorrt_llm' runs on CUDA devices only, "
                                 f"got {device!r}")
    kind = resolve_source(source, field="model").kind
    if kind is not SourceKind.CHECKPOINT:
        raise ValueError(f"model: engine.backend 'tensorrt_llm' needs an HF checkpoint directory, "
                         f"got the {kind.value} {source!r}")
