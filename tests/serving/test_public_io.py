"""The public models' output tensors: which the ensemble sends unasked, and their shapes."""

from __future__ import annotations

import numpy as np
import pytest

from backends.engine.sampling_params import SamplingParams
from backends.serving.public_io import Chunk, Timing, ensemble_tensors
from backends.serving.requests import GenerateRequest

TIMING = Timing(arrival_ns=1000, first_token_ns=2000, last_token_ns=3000, num_prompt_tokens=40,
                num_output_tokens=7, num_cached_tokens=32, kv_transfer_bytes=0, kv_transfer_ns=0)
CHUNK = Chunk("hi", "length", (-0.5, -0.25), 2, TIMING)
ALWAYS = ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens"]
LOG_PROBS = ["cum_log_probs", "output_log_probs"]
KV = ["kv_cache_reused_blocks", "kv_cache_alloc_new_blocks", "kv_cache_hit_rate"]
PERF = ["arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns"]


def request(**flags: bool) -> GenerateRequest:
    return GenerateRequest(api="ensemble", prompt="p", params=SamplingParams(), stream=True,
                           exclude_input_in_output=True, **flags)


@pytest.mark.parametrize(("flags", "names"), [
    ({}, ALWAYS),
    ({"return_logprobs": True}, ALWAYS + LOG_PROBS),
    ({"return_kv_cache_reuse_stats": True}, ALWAYS + KV),
    ({"return_perf_metrics": True}, ALWAYS + PERF),
    ({"return_logprobs": True, "return_kv_cache_reuse_stats": True, "return_perf_metrics": True},
     ALWAYS + LOG_PROBS + KV + PERF),
], ids=["unasked", "log_probs", "kv", "perf", "all"])
def test_ensemble_sends_optional_fields_only_when_asked(flags: dict[str, bool], names: list[str]) -> None:
    assert list(ensemble_tensors(request(**flags), CHUNK, 16)) == names


def test_ensemble_values_and_trtllm_shapes() -> None:
    out = ensemble_tensors(request(return_logprobs=True, return_kv_cache_reuse_stats=True,
                                   return_perf_metrics=True), CHUNK, 16)
    assert {name: (a.shape, a.dtype, a.tolist()) for name, a in out.items()} == {
        "text_output": ((1, 1), np.dtype(object), [[b"hi"]]),
        "finish_reason": ((1, 1), np.dtype(object), [[b"length"]]),
        "num_input_tokens": ((1, 1), np.dtype(np.int32), [[40]]),
        "num_output_tokens": ((1, 1), np.dtype(np.int32), [[2]]),
        "cum_log_probs": ((1, 1), np.dtype(np.float32), [[-0.75]]),
        "output_log_probs": ((1, 1, 2), np.dtype(np.float32), [[[-0.5, -0.25]]]),
        "kv_cache_reused_blocks": ((1, 1), np.dtype(np.int32), [[2]]),  # 32 cached tokens / 16
        "kv_cache_alloc_new_blocks": ((1, 1), np.dtype(np.int32), [[1]]),  # ceil(47 / 16) - 2
        "kv_cache_hit_rate": ((1, 1), np.dtype(np.float32), [[0.800000011920929]]),
        "arrival_time_ns": ((1, 1), np.dtype(np.int64), [[1000]]),
        "first_scheduled_time_ns": ((1, 1), np.dtype(np.int64), [[1000]]),
        "first_token_time_ns": ((1, 1), np.dtype(np.int64), [[2000]]),
        "last_token_time_ns": ((1, 1), np.dtype(np.int64), [[3000]]),
    }
