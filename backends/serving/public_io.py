"""Output tensors of the public models (``llm`` 1-D, ``ensemble`` with a batch dimension)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from backends.serving.requests import GenerateRequest


@dataclass(frozen=True, slots=True)
class Timing:
    """Per-request facts for metrics and the ensemble's perf outputs (ns since the epoch)."""

    arrival_ns: int
    first_token_ns: int
    last_token_ns: int
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    kv_transfer_bytes: int
    kv_transfer_ns: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one public response carries: text (a delta when streaming) and the tokens' facts."""

    text: str
    finish_reason: str  # "" unless final
    logprobs: tuple[float, ...]
    num_output_tokens: int  # tokens in this response (streaming) or in total
    timing: Timing


def _strings(values: list[str], batched: bool) -> np.ndarray:
    array = np.array([v.encode("utf-8") for v in values], dtype=np.object_)
    return array.reshape(1, -1) if batched else array


def llm_tensors(req: GenerateRequest, chunk: Chunk) -> dict[str, np.ndarray]:
    out = {"text_output": _strings([chunk.text], False)}
    if req.return_finish_reason:
        out["finish_reason"] = _strings([chunk.finish_reason], False)
    if req.return_num_input_tokens:
        out["num_input_tokens"] = np.array([chunk.timing.num_prompt_tokens], dtype=np.uint32)
    if req.return_num_output_tokens:
        out["num_output_tokens"] = np.array([chunk.num_output_tokens], dtype=np.uint32)
    if req.return_logprobs:
        out["logprobs"] = _strings([json.dumps(list(chunk.logprobs))], False)
        out["cumulative_logprob"] = np.array([sum(chunk.logprobs)], dtype=np.float32)
    return out


def ensemble_tensors(req: GenerateRequest, chunk: Chunk, block_size: int) -> dict[str, np.ndarray]:
    """text_output, finish_reason and the token counts always; log probs, KV reuse stats and
    perf timestamps only when ``req`` asked for them (perf_analyzer, which requests every
    output, would otherwise get FP32 and INT64 tensors its JSON export cannot write)."""
    t = chunk.timing

    def one(value: int, dtype: type) -> np.ndarray:
        return np.array([[value]], dtype=dtype)

    out = {
        "text_output": _strings([chunk.text], True),
        "finish_reason": _strings([chunk.finish_reason], True),
        "num_input_tokens": one(t.num_prompt_tokens, np.int32),
        "num_output_tokens": one(chunk.num_output_tokens, np.int32),
    }
    if req.return_logprobs:
        out["cum_log_probs"] = np.array([[sum(chunk.logprobs)]], dtype=np.float32)
        out["output_log_probs"] = np.asarray(chunk.logprobs, dtype=np.float32).reshape(1, 1, -1)
    if req.return_kv_cache_reuse_stats:
        reused = t.num_cached_tokens // block_size
        total_blocks = -(-(t.num_prompt_tokens + t.num_output_tokens) // block_size)
        out["kv_cache_reused_blocks"] = one(reused, np.int32)
        out["kv_cache_alloc_new_blocks"] = one(max(total_blocks - reused, 0), np.int32)
        out["kv_cache_hit_rate"] = np.array([[t.num_cached_tokens / max(t.num_prompt_tokens, 1)]], np.float32)
    if req.return_perf_metrics:
        out["arrival_time_ns"] = one(t.arrival_ns, np.int64)
        out["first_scheduled_time_ns"] = one(t.arrival_ns, np.int64)
        out["first_token_time_ns"] = one(t.first_token_ns, np.int64)
        out["last_token_time_ns"] = one(t.last_token_ns, np.int64)
    return out
