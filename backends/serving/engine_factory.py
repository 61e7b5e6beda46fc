"""Building a worker's engine from its ``1/engine.yaml``: the PyTorch LLMEngine, or with
``backend: tensorrt_llm`` TensorRT-LLM's LLM API through backends/engine/trtllm.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from backends.serving.engine_spec import BACKENDS, EngineSpec, check_trtllm_target, load_engine_spec


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
    """A worker's engine for ``spec`` (imports torch and the engine lazily). ``loaded`` is an
    already loaded model for ``spec.source``; ``hooks`` the engine's KVHooks (kvbridge). The
    torch engine returns token ids without text (``detokenize=False``): the orchestrator makes
    the text. ``spec.backend == "tensorrt_llm"``: see :func:`build_trtllm_engine`."""
    if spec.backend == "tensorrt_llm":
        return build_trtllm_engine(spec)
    from backends.engine.engine import LLMEngine
    from backends.engine.engine_config import EngineConfig

    config = EngineConfig(
        block_size=spec.block_size, num_blocks=spec.num_blocks, max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens, max_model_len=spec.max_model_len,
        device=spec.device, dtype=spec.dtype, detokenize=False)
    return LLMEngine(loaded if loaded is not None else spec.source, config, hooks)


def trtllm_kwargs(spec: EngineSpec) -> dict[str, Any]:
    """The ``tensorrt_llm.LLM`` arguments ``spec`` sets: batch and length limits and the dtype.
    TensorRT-LLM sizes its own KV cache (``num_blocks``/``block_size`` do not apply)."""
    return {"max_batch_size": spec.max_num_seqs, "max_num_tokens": spec.max_num_batched_tokens,
            "max_seq_len": spec.max_model_len, "dtype": spec.dtype}


def build_trtllm_engine(spec: EngineSpec) -> Any:
    """A TRTLLMEngine over ``spec.source``, which must be an HF checkpoint directory. ValueError
    naming ``engine.backend`` when tensorrt_llm does not import here (a real import: the message
    carries its reason) or naming ``model`` when the source is not a checkpoint directory."""
    from backends.engine.trtllm import TRTLLMEngine, import_trtllm

    try:
        import_trtllm()
    except RuntimeError as exc:
        raise ValueError(f"engine.backend: 'tensorrt_llm' needs the {BACKENDS['tensorrt_llm']} package, "
                         f"which does not import here ({exc.__cause__ or exc})") from exc
    check_trtllm_target(spec.source, {"device": (spec.device,)})
    return TRTLLMEngine(spec.source, **trtllm_kwargs(spec))
