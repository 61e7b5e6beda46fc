"""A worker's ``1/engine.yaml``: the EngineSpec dataclass and its YAML form, both directions.

The launch side writes the file (backends/launch/deploy.py, from a deployment); the worker
reads it inside tritonserver (engine_factory.py). Both go through this module, so the file's
keys, defaults and checks live in one place and the worker imports no launch tool.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from backends.engine.sources import DEFAULT_MODEL


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What ``1/engine.yaml`` holds: the model source and the EngineConfig fields we expose."""

    source: str = DEFAULT_MODEL
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
    return EngineSpec(**values)


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
