"""The worker models' wire format (TensorRT-LLM core tensor names), both directions.

Request tensors: input_ids INT32 [-1], the sampling tensors (one per SamplingParams field, from
sampling_wire.SAMPLING_FIELDS: request_output_len, temperature, runtime_top_k, ...),
prior_output_ids INT32 [-1] and context_phase_params UINT8 [-1].
Request parameters: ``request_type`` (context_only | generation_only | context_and_generation
| cancel) and ``pd_request_id`` (the id cancel refers to).
Response tensors: output_ids INT32 [-1] (this response's new tokens), sequence_length INT32 [1],
output_log_probs FP32 [-1], finish_reason STRING [1] ("" while running or at hand-off),
num_input_tokens / num_cached_tokens INT32 [1], context_phase_params UINT8 [-1] (prefill
hand-off only), kv_transfer_bytes INT64 [1], kv_transfer_ns INT64 [1], error STRING [1]. A
response carries only output_ids, the counts when final, and the tensors whose value is not the
default (empty, "", 0): a missing tensor reads as its default.
A request that fails after it has streamed data ends with a final update whose finish_reason
is "error" and whose ``error`` is the failure as ``errors.tagged_message`` writes it ("[CODE]
message"), not with an error response: python_backend 2.51 loses a decoupled model's error
response that follows data responses on its way to a BLS caller (under 64 streams with half
of them cancelled, every one was lost; the caller's reader then waits forever, a thread and
~100 KB in the llm stub and tritonserver each). A failure before any data is an error response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from backends.engine.sampling_params import SamplingParams
from backends.serving import sampling_wire
from backends.serving.requests import Inputs

RequestType = Literal["context_only", "generation_only", "context_and_generation", "cancel"]
REQUEST_TYPES: tuple[RequestType, ...] = (
    "context_only", "generation_only", "context_and_generation", "cancel")


@dataclass(frozen=True, slots=True)
class WorkerJob:
    """One request to a worker. ``kv_handle`` is set for generation_only (the prefill's handle)."""

    request_id: str
    request_type: RequestType
    prompt_ids: tuple[int, ...] = ()
    params: SamplingParams = SamplingParams()
    prior_output_ids: tuple[int, ...] = ()
    kv_handle: bytes = b""


@dataclass(frozen=True, slots=True)
class WorkerUpdate:
    """One worker response. ``final`` marks the request's last response."""

    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[float, ...]
    final: bool
    finish_reason: str  # "" while running and at a prefill hand-off
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    context_phase_params: bytes = b""
    kv_transfer_bytes: int = 0
    kv_transfer_ns: int = 0
    error: str = ""  # "[CODE] message" when finish_reason is "error"


CANCEL_ACK = WorkerUpdate((), (), True, "", 0, 0, 0)  # a cancel job's answer


def failure_update(tagged_error: str) -> WorkerUpdate:
    """The final update of a request that failed after streaming data (see the module doc)."""
    return WorkerUpdate((), (), True, "error", 0, 0, 0, error=tagged_error)


def _i32(values: object) -> np.ndarray:
    return np.asarray(values, dtype=np.int32).reshape(-1)


def job_tensors(job: WorkerJob) -> dict[str, np.ndarray]:
    """Tensors the orchestrator sends for ``job`` (parameters go separately: job_parameters)."""
    return {"input_ids": _i32(job.prompt_ids), **sampling_wire.encode(job.params),
            "prior_output_ids": _i32(job.prior_output_ids),
            "context_phase_params": np.frombuffer(job.kv_handle, dtype=np.uint8).copy()}


def job_parameters(job: WorkerJob) -> dict[str, str]:
    return {"request_type": job.request_type, "pd_request_id": job.request_id}


def _opt(inputs: Inputs, name: str) -> np.ndarray | None:
    array = inputs.get(name)
    return None if array is None else np.asarray(array).reshape(-1)


def _ints(inputs: Inputs, name: str) -> tuple[int, ...]:
    array = _opt(inputs, name)
    return () if array is None else tuple(int(t) for t in array)


def parse_job(inputs: Inputs, parameters: Mapping[str, object], fallback_id: str) -> WorkerJob:
    """Worker request tensors + parameters → WorkerJob; ValueError names the bad field."""
    request_type = str(parameters.get("request_type", "context_and_generation"))
    if request_type not in REQUEST_TYPES:
        raise ValueError(f"request_type must be one of {list(REQUEST_TYPES)}, got {request_type!r}")
    request_id = str(parameters.get("pd_request_id") or fallback_id)
    if request_type == "cancel":
        return WorkerJob(request_id, "cancel")
    ids = _opt(inputs, "input_ids")
    if ids is None or ids.size == 0:
        raise ValueError("input_ids: required and must not be empty")
    params = sampling_wire.decode(inputs)
    handle = _opt(inputs, "context_phase_params")
    kv_handle = b"" if handle is None else handle.astype(np.uint8).tobytes()
    if request_type == "generation_only" and not kv_handle:
        raise ValueError("context_phase_params: required for request_type 'generation_only'")
    return WorkerJob(request_id, request_type, _ints(inputs, "input_ids"), params,  # type: ignore[arg-type]
                     _ints(inputs, "prior_output_ids"), kv_handle)


def update_tensors(update: WorkerUpdate) -> dict[str, np.ndarray]:
    """Response tensors of one WorkerUpdate: ``output_ids`` always, the token counts on the
    final response, every other tensor only when its value is not the default (empty, "", 0).
    Most responses of a stream carry one token and nothing else; each tensor costs the stub a
    shared-memory allocation and the orchestrator a copy."""
    tensors = {"output_ids": _i32(update.new_token_ids)}
    if update.new_logprobs:
        tensors["output_log_probs"] = np.asarray(update.new_logprobs, dtype=np.float32).reshape(-1)
    if update.finish_reason:
        tensors["finish_reason"] = np.array([update.finish_reason.encode()], dtype=np.object_)
    if update.final:  # the counts so far: on the last response only
        tensors["sequence_length"] = _i32([update.num_prompt_tokens + update.num_output_tokens])
        tensors["num_input_tokens"] = _i32([update.num_prompt_tokens])
        tensors["num_output_tokens"] = _i32([update.num_output_tokens])
    for name in ("num_cached_tokens", "kv_transfer_bytes", "kv_transfer_ns"):
        value = getattr(update, name)
        if value:
            tensors[name] = np.array([value], dtype=np.int32 if name == "num_cached_tokens" else np.int64)
    if update.context_phase_params:
        tensors["context_phase_params"] = np.frombuffer(update.context_phase_params, dtype=np.uint8).copy()
    if update.error:
        tensors["error"] = np.array([update.error.encode()], dtype=np.object_)
    return tensors


def merge_updates(updates: Sequence[WorkerUpdate]) -> WorkerUpdate:
    """One update standing for ``updates`` (consecutive, of one request, only the last may be
    final): the tokens and log probs in order, the last one's end and counts, the largest
    cache hit, the hand-off if any, the transfer bytes and times summed."""
    if len(updates) == 1:
        return updates[0]
    last = updates[-1]
    return WorkerUpdate(
        tuple(t for u in updates for t in u.new_token_ids), tuple(x for u in updates for x in u.new_logprobs),
        last.final, last.finish_reason, last.num_prompt_tokens, last.num_output_tokens,
        max(u.num_cached_tokens for u in updates),
        next((u.context_phase_params for u in reversed(updates) if u.context_phase_params), b""),
        sum(u.kv_transfer_bytes for u in updates), sum(u.kv_transfer_ns for u in updates), last.error)


def parse_update(outputs: Mapping[str, np.ndarray]) -> WorkerUpdate:
    """Inverse of update_tensors (the orchestrator's side); a missing tensor is its default. A
    response is final when it carries a finish reason or a KV hand-off."""
    def one(name: str) -> int:
        value = outputs.get(name)
        return 0 if value is None else int(np.asarray(value).reshape(-1)[0])
    def text(name: str) -> str:
        value = outputs.get(name)
        item = b"" if value is None else np.asarray(value).reshape(-1)[0]
        return item.decode(errors="replace") if isinstance(item, bytes) else str(item)
    reason = text("finish_reason")
    handle = outputs.get("context_phase_params")
    context = b"" if handle is None else np.asarray(handle, dtype=np.uint8).tobytes()
    logprobs = outputs.get("output_log_probs")
    return WorkerUpdate(
        new_token_ids=tuple(np.asarray(outputs["output_ids"]).reshape(-1).tolist()),
        new_logprobs=() if logprobs is None else tuple(np.asarray(logprobs).reshape(-1).tolist()),
        final=bool(reason) or bool(context),
        finish_reason=reason,
        num_prompt_tokens=one("num_input_tokens"), num_output_tokens=one("num_output_tokens"),
        num_cached_tokens=one("num_cached_tokens"), context_phase_params=context,
        kv_transfer_bytes=one("kv_transfer_bytes"), kv_transfer_ns=one("kv_transfer_ns"), error=text("error"))
