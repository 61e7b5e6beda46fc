"""Tensor specs of every model we serve, and their config.pbtxt rendering.

Names and types follow vllm_backend (``llm``) and tensorrtllm_backend (``ensemble`` and the
TensorRT-LLM core names for the workers); every input a known client sends is declared,
because Triton rejects undeclared inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from backends.serving.sampling_wire import SAMPLING_FIELDS


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    data_type: str  # TYPE_*
    dims: tuple[int, ...]
    optional: bool = True


def _t(name: str, data_type: str, dims: tuple[int, ...] = (1,), optional: bool = True) -> TensorSpec:
    return TensorSpec(name, data_type, dims, optional)


LLM_INPUTS = (
    _t("text_input", "TYPE_STRING", optional=False),
    _t("stream", "TYPE_BOOL"),
    _t("sampling_parameters", "TYPE_STRING"),
    _t("exclude_input_in_output", "TYPE_BOOL"),
    _t("return_finish_reason", "TYPE_BOOL"),
    _t("return_cumulative_logprob", "TYPE_BOOL"),
    _t("return_logprobs", "TYPE_BOOL"),
    _t("return_num_input_tokens", "TYPE_BOOL"),
    _t("return_num_output_tokens", "TYPE_BOOL"),
)
LLM_OUTPUTS = (
    _t("text_output", "TYPE_STRING", (-1,)),
    _t("finish_reason", "TYPE_STRING", (-1,)),
    _t("cumulative_logprob", "TYPE_FP32", (-1,)),
    _t("logprobs", "TYPE_STRING", (-1,)),
    _t("num_input_tokens", "TYPE_UINT32", (1,)),
    _t("num_output_tokens", "TYPE_UINT32", (-1,)),
)

_ENSEMBLE_INT32 = ("max_tokens", "end_id", "pad_id", "top_k", "min_tokens", "min_length",
                   "beam_width", "num_return_sequences", "prompt_vocab_size", "lora_task_id")
_ENSEMBLE_FP32 = ("temperature", "top_p", "length_penalty", "repetition_penalty",
                  "presence_penalty", "frequency_penalty")
_ENSEMBLE_BOOL = ("stream", "exclude_input_in_output", "return_log_probs", "return_context_logits",
                  "return_generation_logits", "return_kv_cache_reuse_stats", "return_perf_metrics")
ENSEMBLE_INPUTS = (
    _t("text_input", "TYPE_STRING", optional=False),
    *(_t(n, "TYPE_INT32") for n in _ENSEMBLE_INT32),
    *(_t(n, "TYPE_FP32") for n in _ENSEMBLE_FP32),
    *(_t(n, "TYPE_BOOL") for n in _ENSEMBLE_BOOL),
    _t("seed", "TYPE_UINT64"),
    _t("random_seed", "TYPE_UINT64"),
    _t("stop_words", "TYPE_STRING", (-1,)),
    _t("bad_words", "TYPE_STRING", (-1,)),
    _t("embedding_bias_words", "TYPE_STRING", (-1,)),
    _t("embedding_bias_weights", "TYPE_FP32", (-1,)),
)
ENSEMBLE_OUTPUTS = (
    _t("text_output", "TYPE_STRING", (-1,)),
    _t("finish_reason", "TYPE_STRING", (-1,)),
    _t("num_input_tokens", "TYPE_INT32", (1,)),
    _t("num_output_tokens", "TYPE_INT32", (1,)),
    _t("cum_log_probs", "TYPE_FP32", (-1,)),
    _t("output_log_probs", "TYPE_FP32", (-1, -1)),
    _t("context_logits", "TYPE_FP32", (-1, -1)),
    _t("generation_logits", "TYPE_FP32", (-1, -1, -1)),
    _t("kv_cache_reused_blocks", "TYPE_INT32", (1,)),
    _t("kv_cache_alloc_new_blocks", "TYPE_INT32", (1,)),
    _t("kv_cache_hit_rate", "TYPE_FP32", (1,)),
    _t("arrival_time_ns", "TYPE_INT64", (1,)),
    _t("first_scheduled_time_ns", "TYPE_INT64", (1,)),
    _t("first_token_time_ns", "TYPE_INT64", (1,)),
    _t("last_token_time_ns", "TYPE_INT64", (1,)),
)

WORKER_INPUTS = (
    _t("input_ids", "TYPE_INT32", (-1,), optional=False),
    *(_t(f.tensor, f.data_type, f.dims) for f in SAMPLING_FIELDS),  # one per SamplingParams field
    _t("prior_output_ids", "TYPE_INT32", (-1,)),
    _t("context_phase_params", "TYPE_UINT8", (-1,)),
)
WORKER_OUTPUTS = (
    _t("output_ids", "TYPE_INT32", (-1,)),
    _t("sequence_length", "TYPE_INT32", (1,)),
    _t("output_log_probs", "TYPE_FP32", (-1,)),
    _t("finish_reason", "TYPE_STRING", (1,)),
    _t("num_input_tokens", "TYPE_INT32", (1,)),
    _t("num_output_tokens", "TYPE_INT32", (1,)),
    _t("num_cached_tokens", "TYPE_INT32", (1,)),
    _t("context_phase_params", "TYPE_UINT8", (-1,)),
    _t("kv_transfer_bytes", "TYPE_INT64", (1,)),
    _t("kv_transfer_ns", "TYPE_INT64", (1,)),
    _t("error", "TYPE_STRING", (1,)),
)


def _tensor_block(kind: str, specs: Sequence[TensorSpec], with_optional: bool) -> str:
    items = []
    for s in specs:
        dims = ", ".join(str(d) for d in s.dims)
        opt = f"\n    optional: {'true' if s.optional else 'false'}" if with_optional else ""
        items.append(f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n    dims: [ {dims} ]{opt}\n  }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model of the repository, rendered by ``render_config``."""

    name: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: Mapping[str, str]
    instance_count: int = 1
    decoupled: bool = True  # False: one response per request (HTTP/gRPC infer, no streaming)


def render_config(spec: ModelSpec) -> str:
    """config.pbtxt text (KIND_CPU instances; parameters sorted by key).

    A non-decoupled model with a batch dimension also gets ``dynamic_batching``: its execute
    returns only when every request of the batch is done, so requests queued meanwhile must
    arrive together in the next batch (where they run concurrently) instead of one by one.
    """
    params = "".join(
        f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n'
        for k, v in sorted(spec.parameters.items()))
    return (
        f'name: "{spec.name}"\nbackend: "{spec.backend}"\nmax_batch_size: {spec.max_batch_size}\n'
        f"model_transaction_policy {{\n  decoupled: {'true' if spec.decoupled else 'false'}\n}}\n"
        + ("dynamic_batching {\n}\n" if not spec.decoupled and spec.max_batch_size > 0 else "")
        + _tensor_block("input", spec.inputs, True) + _tensor_block("output", spec.outputs, False)
        + f"instance_group [\n  {{\n    count: {spec.instance_count}\n    kind: KIND_CPU\n  }}\n]\n"
        + params)
