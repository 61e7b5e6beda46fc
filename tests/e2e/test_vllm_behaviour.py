"""vllm_backend's own behaviours that its clients rely on, through the real server (issue 12).

- A non-streaming request sent over gRPC ``stream_infer`` and cancelled by the client with
  ``stop_stream(cancel_requests=True)`` ends with ``StatusCode.CANCELLED`` and nothing else,
  and its KV blocks are freed on every worker.
- ``max_tokens`` beyond the model's room (max_model_len - prompt) is not an error: as in vLLM
  (v1 ``check_stop``: ``num_tokens >= max_model_len`` -> FINISHED_LENGTH_CAPPED) generation
  stops when the sequence fills max_model_len, with finish_reason "length". Only a prompt longer
  than max_model_len is refused.
"""

from __future__ import annotations

import json
import queue
import re
import time
from functools import partial
from typing import Any

import numpy as np
import pytest
import requests

from backends.engine.tokenizer import byte_level_tokenizer

pytestmark = pytest.mark.e2e
pytest_plugins = ("disagg_plugin",)  # the session's one disaggregated server: disagg_served
TOK = byte_level_tokenizer()
NUM_BLOCKS = 128  # tests/e2e/conftest.py
MAX_MODEL_LEN = 512
WORKERS = {"worker": NUM_BLOCKS, "mla_worker": NUM_BLOCKS}
Served = Any  # conftest.Served


def _kv_free(served: Served) -> dict[str, float]:
    text = requests.get(served.metrics_url, timeout=10).text
    return {m: float(v) for m, v in re.findall(r'pd_kv_blocks_free\{model="(\w+)"\} ([\d.]+)', text)}


def _wait_kv(served: Served, done: Any, timeout_s: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    free = _kv_free(served)
    while not done(free) and time.monotonic() < deadline:
        time.sleep(0.1)
        free = _kv_free(served)
    return free


def _llm_inputs(prompt: str, params: dict[str, Any], stream: bool) -> list[Any]:
    import tritonclient.grpc as grpcclient

    values = {"text_input": np.array([prompt.encode()], dtype=np.object_),
              "stream": np.array([stream]),
              "sampling_parameters": np.array([json.dumps(params).encode()], dtype=np.object_),
              "exclude_input_in_output": np.array([True])}
    tensors = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, [1], "BOOL" if value.dtype == np.bool_ else "BYTES")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def _cancel_non_streaming(served: Served, workers: dict[str, float], busy: str | None) -> None:
    """Sends a long non-streaming request over stream_infer, cancels it once worker ``busy``
    holds blocks for it (at once when None), and checks what the client and the workers see."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(served.grpc_url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    params = {"max_tokens": 250, "temperature": 0, "ignore_eos": True}
    client.async_stream_infer("llm", _llm_inputs(f"cancel this non-streaming request {busy}", params, False))
    if busy is not None:
        running = _wait_kv(served, lambda free: free.get(busy, NUM_BLOCKS) < NUM_BLOCKS)
        assert running[busy] < NUM_BLOCKS  # generating (its blocks are taken) when cancelled
    client.stop_stream(cancel_requests=True)
    client.close()
    got = []
    while not results.empty():
        got.append(results.get())
    assert [(result, error.status()) for result, error in got] == [(None, "StatusCode.CANCELLED")]
    assert _wait_kv(served, lambda free: free == workers) == workers
    # nothing arrives late on the cancelled stream, and the server keeps serving
    time.sleep(0.5)
    assert results.empty()
    r = requests.post(f"http://{served.http_url}/v2/models/llm/generate", timeout=60, json={
        "text_input": "after", "sampling_parameters": json.dumps({"max_tokens": 3, "temperature": 0,
                                                                  "ignore_eos": True})})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("busy", [None, "worker"])
def test_non_streaming_request_cancelled_over_stream_infer(served: Served, busy: str | None) -> None:
    _cancel_non_streaming(served, WORKERS, busy)


@pytest.mark.parametrize("busy", [None, "decode"])
def test_non_streaming_request_cancelled_over_stream_infer_disaggregated(disagg_served: Any,
                                                                         busy: str | None) -> None:
    _cancel_non_streaming(disagg_served, {"prefill": NUM_BLOCKS, "decode": NUM_BLOCKS}, busy)


def _generate(served: Served, prompt: str, max_tokens: int) -> requests.Response:
    params = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return requests.post(f"http://{served.http_url}/v2/models/llm/generate", timeout=120, json={
        "text_input": prompt, "sampling_parameters": json.dumps(params), "exclude_input_in_output": True,
        "return_finish_reason": True, "return_num_input_tokens": True, "return_num_output_tokens": True})


@pytest.mark.parametrize("max_tokens", [256, 240])
def test_max_tokens_beyond_the_room_stops_at_max_model_len(served: Served, max_tokens: int) -> None:
    prompt = "y" * 299
    num_prompt = len(TOK.encode(prompt))
    room = MAX_MODEL_LEN - num_prompt
    assert room < max_tokens
    r = _generate(served, prompt, max_tokens)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["num_input_tokens"], body["num_output_tokens"], body["finish_reason"]) == \
        (num_prompt, room, "length")
    assert _wait_kv(served, lambda free: free == WORKERS) == WORKERS


def test_prompt_that_fills_max_model_len_gets_one_token(served: Served) -> None:
    """vLLM takes a prompt of exactly max_model_len tokens and caps it after one token."""
    prompt = "z" * MAX_MODEL_LEN
    assert len(TOK.encode(prompt)) == MAX_MODEL_LEN
    r = _generate(served, prompt, 8)
    assert r.status_code == 200, r.text
    assert (r.json()["num_output_tokens"], r.json()["finish_reason"]) == (1, "length")


def test_prompt_longer_than_max_model_len_is_invalid_arg(served: Served) -> None:
    prompt = "z" * (MAX_MODEL_LEN + 1)
    num_prompt = len(TOK.encode(prompt))
    r = _generate(served, prompt, 8)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == (f"text_input: the prompt (length {num_prompt}) is longer than the "
                                 f"maximum model length of {MAX_MODEL_LEN}")
