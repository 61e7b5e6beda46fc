"""End to end through a real tritonserver: llm / ensemble, streaming, errors, cancel, load."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from functools import partial
from typing import Any

import numpy as np
import pytest
import requests
from expected_text import finished_text

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer

pytestmark = pytest.mark.e2e
TOK = byte_level_tokenizer()
NUM_BLOCKS = 128  # the served deployment's pool (tests/e2e/conftest.py)
WORKERS = {"worker": NUM_BLOCKS, "mla_worker": NUM_BLOCKS}
Served = Any  # conftest.Served
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def reference() -> LLMEngine:
    return LLMEngine("tiny-llama", EngineConfig(num_blocks=NUM_BLOCKS, max_model_len=512))


def engine_result(engine: LLMEngine, prompt: str, max_tokens: int) -> tuple[str, str, int]:
    """(text, finish_reason, num_output_tokens) of the single-process engine, greedy; the text as
    the server sends it (expected_text.finished_text)."""
    [result] = engine.generate([TOK.encode(prompt)], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return finished_text(TOK.decode(list(result.output_token_ids))), str(result.finish_reason), len(result.output_token_ids)


def engine_text(engine: LLMEngine, prompt: str, max_tokens: int) -> str:
    return engine_result(engine, prompt, max_tokens)[0]


def generate(served: Served, model: str, body: dict) -> requests.Response:
    return requests.post(f"http://{served.http_url}/v2/models/{model}/generate", json=body, timeout=60)


def sse_texts(served: Served, model: str, body: dict) -> list[str]:
    r = requests.post(f"http://{served.http_url}/v2/models/{model}/generate_stream", json=body,
                      timeout=60, stream=True)
    assert r.status_code == 200
    lines = [str(line) for line in r.iter_lines(decode_unicode=True)]
    events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    return [e["text_output"] for e in events]


def greedy(max_tokens: int) -> str:
    return json.dumps({"max_tokens": max_tokens, "temperature": 0})


def test_llm_greedy_equals_engine(served: Served, reference: LLMEngine) -> None:
    r = generate(served, "llm", {"text_input": PROMPT, "sampling_parameters": greedy(12),
                                 "exclude_input_in_output": True, "return_finish_reason": True,
                                 "return_num_input_tokens": True, "return_num_output_tokens": True})
    assert r.status_code == 200, r.text
    body = r.json()
    text, reason, num_out = engine_result(reference, PROMPT, 12)
    assert (body["text_output"], body["finish_reason"], body["num_output_tokens"]) == (text, reason, num_out)
    assert body["num_input_tokens"] == len(TOK.encode(PROMPT))


def test_llm_includes_prompt_by_default(served: Served, reference: LLMEngine) -> None:
    r = generate(served, "llm", {"text_input": PROMPT, "sampling_parameters": greedy(5)})
    assert r.json()["text_output"] == PROMPT + engine_text(reference, PROMPT, 5)


def test_ensemble_greedy_equals_engine(served: Served, reference: LLMEngine) -> None:
    r = generate(served, "ensemble", {"text_input": PROMPT, "max_tokens": 10, "temperature": 0.0,
                                      "exclude_input_in_output": True})
    assert r.status_code == 200, r.text
    body = r.json()
    text, reason, num_out = engine_result(reference, PROMPT, 10)
    assert (body["text_output"], body["finish_reason"], body["num_output_tokens"]) == (text, reason, num_out)


def test_stream_deltas_concatenate_to_full_text(served: Served, reference: LLMEngine) -> None:
    deltas = sse_texts(served, "llm", {"text_input": PROMPT, "stream": True, "sampling_parameters": greedy(16)})
    assert "".join(deltas) == engine_text(reference, PROMPT, 16)
    assert all(deltas[:-1]), deltas  # no event before the final one has empty text (issue 12)


def test_multibyte_prompt_and_output_intact(served: Served, reference: LLMEngine) -> None:
    prompt = "naïve café — 東京 😀"
    deltas = sse_texts(served, "llm", {"text_input": prompt, "stream": True, "sampling_parameters": greedy(12)})
    full = generate(served, "llm", {"text_input": prompt, "sampling_parameters": greedy(12)}).json()
    assert full["text_output"] == prompt + engine_text(reference, prompt, 12)
    assert "".join(deltas) == engine_text(reference, prompt, 12)
    assert all(deltas[:-1]), deltas  # bytes of an incomplete character wait; no empty event goes out


@pytest.mark.parametrize(("body", "field"), [
    ({"sampling_parameters": greedy(4)}, "text_input"),
    ({"text_input": "hi", "sampling_parameters": "{not json"}, "sampling_parameters"),
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": 4, "bogus": 1}'}, "sampling_parameters.bogus"),
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": 0}'}, "sampling_parameters.max_tokens"),
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": -3}'}, "sampling_parameters.max_tokens"),
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": 100000}'}, "sampling_parameters.max_tokens"),
    ({"text_input": "x" * 600, "sampling_parameters": greedy(4)}, "text_input"),
])
def test_bad_request_is_invalid_arg_naming_field(served: Served, body: dict, field: str) -> None:
    r = generate(served, "llm", body)
    assert r.status_code == 400
    assert field in r.json()["error"]
    ok = generate(served, "llm", {"text_input": "ok", "sampling_parameters": greedy(2)})
    assert ok.status_code == 200


def test_wrong_dtype_is_rejected_naming_field(served: Served) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(served.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    stream = grpcclient.InferInput("stream", [1], "INT32")
    stream.set_data_from_numpy(np.array([1], dtype=np.int32))
    client.async_stream_infer("llm", [text, stream])
    _, error = results.get(timeout=30)
    client.stop_stream()
    client.close()
    assert isinstance(error, InferenceServerException)
    assert "inference input 'stream' data-type is 'INT32', but model 'llm' expects 'BOOL'" in str(error)


def test_stream_with_input_in_output_is_invalid_arg(served: Served) -> None:
    r = requests.post(f"http://{served.http_url}/v2/models/llm/generate_stream",
                      json={"text_input": "hi", "stream": True, "exclude_input_in_output": False}, timeout=30)
    assert "exclude_input_in_output" in r.text
    # vllm_backend's exact text reaches the client
    assert ("Error generating stream: When streaming, `exclude_input_in_output` = False is "
            "not allowed.") in r.text


def _kv_free(served: Served) -> dict[str, float]:
    text = requests.get(served.metrics_url, timeout=10).text
    return {m: float(v) for m, v in re.findall(r'pd_kv_blocks_free\{model="(\w+)"\} ([\d.]+)', text)}


def _wait_all_free(served: Served) -> dict[str, float]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        free = _kv_free(served)
        if free == WORKERS:
            break
        time.sleep(0.2)
    return free


def _grpc_stream(served: Served, n: int, prompts: list[str], max_tokens: int):
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(served.grpc_url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    for i, prompt in enumerate(prompts):
        inputs = [grpcclient.InferInput("text_input", [1], "BYTES"),
                  grpcclient.InferInput("stream", [1], "BOOL"),
                  grpcclient.InferInput("sampling_parameters", [1], "BYTES"),
                  grpcclient.InferInput("return_num_output_tokens", [1], "BOOL")]
        inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.array([True]))
        inputs[3].set_data_from_numpy(np.array([True]))
        inputs[2].set_data_from_numpy(np.array([json.dumps({"max_tokens": max_tokens, "temperature": 0,
                                                            "ignore_eos": True}).encode()], dtype=np.object_))
        client.async_stream_infer("llm", inputs, request_id=str(i), enable_empty_final_response=True,
                                  outputs=[grpcclient.InferRequestedOutput("text_output"),
                                           grpcclient.InferRequestedOutput("num_output_tokens")])
    return client, results


def test_cancel_mid_stream_frees_blocks(served: Served, reference: LLMEngine) -> None:
    client, results = _grpc_stream(served, 1, ["cancel me please"], 200)
    result, error = results.get(timeout=30)
    assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    assert _wait_all_free(served) == WORKERS
    after = generate(served, "llm", {"text_input": "after", "sampling_parameters": greedy(3)})
    assert after.json()["text_output"] == "after" + engine_text(reference, "after", 3)
    deltas = sse_texts(served, "llm", {"text_input": "after", "stream": True, "sampling_parameters": greedy(3)})
    assert "".join(deltas) == engine_text(reference, "after", 3)
    # The cancelled stream's worker iterator was read to its end (else the llm stub could not
    # finalize at shutdown): checked by the served fixture's teardown (no /dev/shm region left).


def test_32_concurrent_streams_account_for_every_token(served: Served, reference: LLMEngine) -> None:
    prompts = [f"request number {i}" for i in range(32)]
    client, results = _grpc_stream(served, 32, prompts, 8)
    tokens = dict.fromkeys(range(32), 0)
    finals: set[int] = set()
    deadline = time.monotonic() + 120
    while len(finals) < 32 and time.monotonic() < deadline:
        result, error = results.get(timeout=60)
        assert error is None, error
        rid = int(result.get_response().id)
        out = result.as_numpy("num_output_tokens")
        if out is not None:
            tokens[rid] += int(out.sum())
        if result.get_response().parameters["triton_final_response"].bool_param:
            finals.add(rid)
    client.stop_stream()
    client.close()
    assert finals == set(range(32))
    assert tokens == dict.fromkeys(range(32), 8)
    assert _wait_all_free(served) == WORKERS


def test_first_response_arrives_before_decoding_finishes(served: Served) -> None:
    client, results = _grpc_stream(served, 1, ["time me"], 64)
    first, _ = results.get(timeout=30)
    t_first = time.monotonic()
    last = first
    while not last.get_response().parameters["triton_final_response"].bool_param:
        last, error = results.get(timeout=30)
        assert error is None
    assert time.monotonic() > t_first
    assert first.as_numpy("text_output") is not None
    client.stop_stream()
    client.close()


def test_metrics_exported(served: Served) -> None:
    text = requests.get(served.metrics_url, timeout=10).text
    for name in ("pd_ttft_seconds_count", "pd_e2e_seconds_count", "pd_prompt_tokens_total",
                 "pd_generation_tokens_total", "pd_kv_blocks_used", "pd_kv_blocks_free"):
        assert name in text, name
    _ = threading  # threads are the client's; nothing to join here
