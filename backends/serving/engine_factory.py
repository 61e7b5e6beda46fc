"""Building a worker's LLMEngine from its ``1/engine.yaml``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from backends.serving.engine_spec import EngineSpec, load_engine_spec


def engine_spec_for(model_dir: Path) -> EngineSpec:
    """``<model_dir>/1/engine.yaml`` if present, else the defaults (tiny preset on CPU)."""
    path = model_dir / "1" / "engine.yaml"
    return load_engine_spec(path) if path.is_file() else EngineSpec()


def worker_threads(spec: EngineSpec, cpus: int | None = None) -> int:
    """Torch intra-op threads for a worker process: ``spec.threads``, or (0) this process's
    CPUs split evenly between the deployment's worker processes and one more share for
    tritonserver and the orchestrator, at least 1. Oversubscribed workers (every one running
    as many threads as there are cores) cost more than a thread each on a small host."""
    if spec.threads > 0:
        return spec.threads
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // (spec.host_workers + 1))


def torch_dtype(name: str) -> Any:
    """The torch dtype named ``name`` (float32, float16, bfloat16)."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: unknown torch dtype {name!r}")
    return dtype


def build_engine(spec: EngineSpec, *, loaded: Any = None, hooks: Any = None) -> Any:
    """A worker's LLMEngine for ``spec`` (imports torch and the engine lazily). ``loaded`` is an
    already loaded model for ``spec.source``; ``hooks`` the engine's KVHooks (kvbridge). It
    returns token ids without text (``detokenize=False``): the orchestrator makes the text."""
    from backends.engine.engine import LLMEngine
    from backends.engine.engine_config import EngineConfig

    config = EngineConfig(
        block_size=spec.block_size, num_blocks=spec.num_blocks, max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens, max_model_len=spec.max_model_len,
        device=spec.device, dtype=spec.dtype, detokenize=False)
    return LLMEngine(loaded if loaded is not None else spec.source, config, hooks)
