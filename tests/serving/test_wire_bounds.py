"""Every numeric field against what the worker wire carries (issue 8), with exact error texts;
and a worker's error code across BLS (python_backend 2.51 drops it; it rides in the message)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from backends.serving.errors import split_worker_message
from backends.serving.requests import Limits, parse_ensemble, parse_llm
from backends.serving.wire_bounds import FP32_MIN_NORMAL, INT32_MAX, UINT64_MAX

LIMITS = Limits(max_tokens=64)


def llm(sampling: dict[str, object] | str) -> object:
    raw = sampling if isinstance(sampling, str) else json.dumps(sampling)
    return parse_llm({"text_input": np.array([b"hi"], dtype=np.object_),
                      "sampling_parameters": np.array([raw.encode()], dtype=np.object_)}, LIMITS)


@pytest.mark.parametrize(("sampling", "error"), [
    ({"top_k": 4294967297}, "sampling_parameters.top_k must be in [0, 2147483647] (INT32), got 4294967297"),
    ({"top_k": 10**12}, "sampling_parameters.top_k must be in [0, 2147483647] (INT32), got 1000000000000"),
    ({"stop_token_ids": [4294967348]},
     "sampling_parameters.stop_token_ids must be in [0, 2147483647] (INT32), got 4294967348"),
    ({"stop_token_ids": [2**63]},
     "sampling_parameters.stop_token_ids must be in [0, 2147483647] (INT32), got 9223372036854775808"),
    ({"seed": -1}, "sampling_parameters.seed must be in [0, 18446744073709551615] (UINT64), got -1"),
    ({"seed": 2**64},
     "sampling_parameters.seed must be in [0, 18446744073709551615] (UINT64), got 18446744073709551616"),
    ({"top_p": 1e-50},
     "sampling_parameters.top_p must be in [1.1754943508222875e-38, 1.0] (FP32), got 1e-50"),
    ({"temperature": 1e308},
     "sampling_parameters.temperature must be in [0.0, 3.4028234663852886e+38] (FP32), got 1e+308"),
    ({"repetition_penalty": 1e39},
     "sampling_parameters.repetition_penalty must be in [1.1754943508222875e-38, 3.4028234663852886e+38] "
     "(FP32), got 1e+39"),
])
def test_llm_values_the_wire_cannot_carry_are_refused_naming_field_and_value(
        sampling: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError) as info:
        llm({"max_tokens": 4, **sampling})
    assert str(info.value) == error


def test_deeply_nested_json_is_refused_by_name() -> None:
    with pytest.raises(ValueError) as info:
        llm('{"a": ' * 100_000 + "1" + "}" * 100_000)
    assert str(info.value) == "sampling_parameters: JSON nested too deeply"


def test_the_edges_of_the_wire_are_accepted() -> None:
    req: object = llm({"max_tokens": 4, "top_k": INT32_MAX, "seed": UINT64_MAX, "top_p": FP32_MIN_NORMAL,
                       "stop_token_ids": [INT32_MAX], "temperature": 3.4028234663852886e38})
    params = req.params  # type: ignore[attr-defined]
    assert (params.top_k, params.seed, params.top_p, params.stop_token_ids) == (
        INT32_MAX, UINT64_MAX, FP32_MIN_NORMAL, (INT32_MAX,))
    assert np.float32(params.top_p) > 0 and np.isfinite(np.float32(params.temperature))


def ensemble(**tensors: np.ndarray) -> object:
    inputs = {"text_input": np.array([[b"hi"]], dtype=np.object_), "max_tokens": np.array([[4]], dtype=np.int32)}
    return parse_ensemble({**inputs, **tensors}, LIMITS)


@pytest.mark.parametrize(("name", "value", "error"), [
    ("seed", np.array([[-1]], dtype=np.int64),
     "seed must be in [0, 18446744073709551615] (UINT64), got -1"),
    ("random_seed", np.array([[-5]], dtype=np.int64),
     "random_seed must be in [0, 18446744073709551615] (UINT64), got -5"),
])
def test_ensemble_values_are_refused_under_the_callers_names(name: str, value: np.ndarray, error: str) -> None:
    with pytest.raises(ValueError) as info:
        ensemble(**{name: value})
    assert str(info.value) == error


def test_a_worker_errors_code_comes_back_out_of_its_message() -> None:
    assert split_worker_message("[INVALID_ARG] top_p must be in (0, 1], got 0.0", "INTERNAL") == (
        "top_p must be in (0, 1], got 0.0", "INVALID_ARG")
    assert split_worker_message("Stub process 'decode_0_0' is not healthy.", "INTERNAL") == (
        "Stub process 'decode_0_0' is not healthy.", "INTERNAL")
    assert split_worker_message("[NOT_A_CODE] x", "UNAVAILABLE") == ("[NOT_A_CODE] x", "UNAVAILABLE")


def test_invalid_arg_from_decode_is_neither_retried_nor_recomputed() -> None:
    from collections.abc import AsyncIterator

    from backends.engine.sampling_params import SamplingParams
    from backends.engine.tokenizer import byte_level_tokenizer
    from backends.serving.errors import WorkerError
    from backends.serving.orchestrator import Orchestrator
    from backends.serving.requests import GenerateRequest
    from backends.serving.supervisor import Supervisor
    from backends.serving.worker_io import WorkerJob, WorkerUpdate

    tok = byte_level_tokenizer()
    jobs: list[tuple[str, str]] = []

    class Workers:
        async def stream(self, model: str, job: WorkerJob) -> AsyncIterator[WorkerUpdate]:
            jobs.append((model, job.request_type))
            if model == "decode":
                raise WorkerError("decode: top_p must be in (0, 1], got 0.0", "INVALID_ARG")
            yield WorkerUpdate(tuple(tok.encode("A")), (), True, "", 3, 1, 0, b"h", 1)

        async def cancel(self, model: str, request_id: str) -> None:
            jobs.append((model, "cancel"))

    class Channel:
        def send(self, chunk: object, final: bool) -> None:
            pass

        def is_cancelled(self) -> bool:
            return False

    orch = Orchestrator(tok, Supervisor(["prefill"], ["decode"], True), Workers(), 512)
    req = GenerateRequest("llm", "hello", SamplingParams(max_tokens=4, temperature=0.0), True, True)
    with pytest.raises(WorkerError, match=r"^decode: top_p must be in \(0, 1\], got 0\.0$"):
        asyncio.run(orch.handle(req, Channel()))
    assert jobs == [("prefill", "context_only"), ("decode", "generation_only"), ("prefill", "cancel")]
