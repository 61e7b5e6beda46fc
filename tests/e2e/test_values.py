"""Numbers the worker wire cannot carry, through a real tritonserver (issue 8): the caller gets
INVALID_ARG naming the field and the value as sent, instead of a silently wrapped or rounded
value; and a worker's own INVALID_ARG keeps its code across BLS (it rides in the message,
python_backend 2.51 drops it), which is what keeps the orchestrator from retrying it."""

from __future__ import annotations

import json
import queue

import numpy as np
import pytest
import requests
from conftest import Served

pytestmark = pytest.mark.e2e


def _generate(served: Served, sampling: dict[str, object] | str) -> requests.Response:
    raw = sampling if isinstance(sampling, str) else json.dumps(sampling)
    return requests.post(f"http://{served.http_url}/v2/models/llm/generate",
                         json={"text_input": "hi", "sampling_parameters": raw}, timeout=60)


@pytest.mark.parametrize(("sampling", "error"), [
    ({"top_k": 4294967297}, "sampling_parameters.top_k must be in [0, 2147483647] (INT32), got 4294967297"),
    ({"stop_token_ids": [4294967348]},
     "sampling_parameters.stop_token_ids must be in [0, 2147483647] (INT32), got 4294967348"),
    ({"seed": -1}, "sampling_parameters.seed must be in [0, 18446744073709551615] (UINT64), got -1"),
    ({"seed": 2**64},
     "sampling_parameters.seed must be in [0, 18446744073709551615] (UINT64), got 18446744073709551616"),
    ({"top_p": 1e-50}, "sampling_parameters.top_p must be in [1.1754943508222875e-38, 1.0] (FP32), got 1e-50"),
    ({"temperature": 1e308},
     "sampling_parameters.temperature must be in [0.0, 3.4028234663852886e+38] (FP32), got 1e+308"),
])
def test_out_of_range_values_are_invalid_arg_with_field_and_value(served: Served, sampling: dict[str, object],
                                                                  error: str) -> None:
    r = _generate(served, {"max_tokens": 4, **sampling})
    assert (r.status_code, r.json()) == (400, {"error": error})


def test_deeply_nested_sampling_parameters_are_invalid_arg(served: Served) -> None:
    r = _generate(served, '{"a": ' * 100_000 + "1" + "}" * 100_000)
    assert (r.status_code, r.json()) == (400, {"error": "sampling_parameters: JSON nested too deeply"})


def test_a_workers_invalid_arg_carries_its_code_in_the_message(served: Served) -> None:
    """Called directly (as the orchestrator calls it over BLS), a worker refuses top_p 0 with
    INVALID_ARG, its code at the head of the message."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue[tuple[object, object]] = queue.Queue()
    client = grpcclient.InferenceServerClient(served.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        ids = grpcclient.InferInput("input_ids", [3], "INT32")
        ids.set_data_from_numpy(np.array([1, 2, 3], dtype=np.int32))
        top_p = grpcclient.InferInput("runtime_top_p", [1], "FP32")
        top_p.set_data_from_numpy(np.array([0.0], dtype=np.float32))
        client.async_stream_infer("worker", [ids, top_p], request_id="values-1",
                                  parameters={"request_type": "context_and_generation",
                                              "pd_request_id": "values-1"})
        _, error = results.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    assert error is not None
    assert error.message() == "[INVALID_ARG] top_p must be in (0, 1], got 0.0"  # type: ignore[attr-defined]
