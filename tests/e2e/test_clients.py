"""Client paths against the real server, with HF transformers as the oracle.

Greedy output through ``llm`` and ``ensemble`` equals HF ``generate`` (do_sample=False) on the
preset's exported weights, for tiny-llama and tiny-mla (the text: HF's tokens decoded, less a
character the cut left incomplete; expected_text.py); gRPC ``stream_infer``, ``generate`` and
``generate_stream`` all carry the same text. Triton 2.51 refuses HTTP ``/infer`` for decoupled
models (as for vllm_backend): the refusal is a clean 501 and the server keeps serving. Bodies the
generate endpoint cannot convert are answered by Triton itself (500 with its parser message);
values our backend rejects are 400 INVALID_ARG naming the field.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from expected_text import finished_text

from backends.engine.loader import export_preset
from backends.engine.tokenizer import byte_level_tokenizer

pytestmark = pytest.mark.e2e
TOK = byte_level_tokenizer()
PRESETS = {"tiny-llama": "", "tiny-mla": "mla_"}  # preset -> model-name prefix (conftest)
PROMPT = "Paris is the capital of"
Served = Any  # conftest.Served
HF = Callable[[str, str, int, bool], list[int]]


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> HF:
    """(preset, prompt, max_new_tokens, ignore_eos) -> HF greedy token ids (EOS excluded)."""
    transformers = pytest.importorskip("transformers")
    models: dict[str, Any] = {}

    def run(preset: str, prompt: str, max_new_tokens: int, ignore_eos: bool) -> list[int]:
        if preset not in models:
            directory: Path = export_preset(preset, tmp_path_factory.mktemp(preset))
            models[preset] = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
        ids = TOK.encode(prompt)
        with torch.no_grad():
            out = models[preset].generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                          min_new_tokens=max_new_tokens if ignore_eos else 0,
                                          eos_token_id=None if ignore_eos else TOK.eos_token_id,
                                          pad_token_id=0)
        tokens = out[0, len(ids):].tolist()
        return tokens[:tokens.index(TOK.eos_token_id)] if TOK.eos_token_id in tokens else tokens

    return run


def generate(served: Served, model: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"http://{served.http_url}/v2/models/{model}/generate", json=body, timeout=60)


def greedy(max_tokens: int) -> str:
    return json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})


@pytest.mark.parametrize("preset", PRESETS)
def test_llm_greedy_equals_hf(served: Served, hf: HF, preset: str) -> None:
    r = generate(served, f"{PRESETS[preset]}llm", {
        "text_input": PROMPT, "sampling_parameters": greedy(12), "exclude_input_in_output": True,
        "return_num_output_tokens": True, "return_finish_reason": True})
    assert r.status_code == 200, r.text
    ref = hf(preset, PROMPT, 12, True)
    assert (r.json()["text_output"], r.json()["num_output_tokens"], r.json()["finish_reason"]) == \
        (finished_text(TOK.decode(ref)), 12, "length")


@pytest.mark.parametrize("preset", PRESETS)
def test_ensemble_greedy_equals_hf(served: Served, hf: HF, preset: str) -> None:
    """The ensemble has no ignore_eos: EOS ends both the same way."""
    r = generate(served, f"{PRESETS[preset]}ensemble",
                 {"text_input": PROMPT, "max_tokens": 16, "temperature": 0.0, "exclude_input_in_output": True})
    assert r.status_code == 200, r.text
    ref = hf(preset, PROMPT, 16, False)
    assert (r.json()["text_output"], r.json()["num_output_tokens"], r.json()["finish_reason"]) == \
        (finished_text(TOK.decode(ref)), len(ref), "length" if len(ref) == 16 else "stop")


def _grpc_stream(served: Served, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[Any]:
    """Every response of one streamed request (the empty final flag-only one included)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(served.grpc_url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    tensors = []
    for name, value in inputs.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    client.async_stream_infer(model, tensors, enable_empty_final_response=True,
                              outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
    responses = []
    while True:
        result, error = results.get(timeout=60)
        assert error is None, error
        responses.append(result)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return responses


def _texts(responses: list[Any]) -> list[str]:
    return [b"".join(r.as_numpy("text_output").reshape(-1)).decode() for r in responses
            if r.as_numpy("text_output") is not None]


def test_grpc_stream_llm_deltas_equal_hf(served: Served, hf: HF) -> None:
    responses = _grpc_stream(served, "llm", {
        "text_input": np.array([PROMPT.encode()], dtype=np.object_), "stream": np.array([True]),
        "sampling_parameters": np.array([greedy(16).encode()], dtype=np.object_),
        "return_num_output_tokens": np.array([True])}, ["text_output", "num_output_tokens"])
    deltas = _texts(responses)
    assert len(deltas) > 2  # streamed, not one blob
    assert "".join(deltas) == finished_text(TOK.decode(hf("tiny-llama", PROMPT, 16, True)))
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in responses
               if r.as_numpy("num_output_tokens") is not None) == 16


def test_grpc_stream_ensemble_has_trtllm_shapes(served: Served, hf: HF) -> None:
    """tensorrtllm_backend clients send [1, 1] inputs and read [1, ...] outputs."""
    outputs = ["text_output", "cum_log_probs", "output_log_probs", "num_output_tokens", "finish_reason"]
    responses = _grpc_stream(served, "ensemble", {
        "text_input": np.array([[PROMPT.encode()]], dtype=np.object_),
        "max_tokens": np.array([[16]], dtype=np.int32), "stream": np.array([[True]]),
        "temperature": np.array([[0.0]], dtype=np.float32), "return_log_probs": np.array([[True]])}, outputs)
    with_tensors = [r for r in responses if r.as_numpy("text_output") is not None]
    for r in with_tensors:
        n = int(r.as_numpy("num_output_tokens")[0, 0])
        assert (r.as_numpy("text_output").shape, r.as_numpy("cum_log_probs").shape,
                r.as_numpy("output_log_probs").shape, r.as_numpy("num_output_tokens").shape) == \
            ((1, 1), (1, 1), (1, 1, n), (1, 1))
    ref = hf("tiny-llama", PROMPT, 16, False)
    assert "".join(_texts(with_tensors)) == finished_text(TOK.decode(ref))
    assert sum(int(r.as_numpy("num_output_tokens")[0, 0]) for r in with_tensors) == len(ref)
    assert with_tensors[-1].as_numpy("finish_reason").tolist() == [[b"length" if len(ref) == 16 else b"stop"]]


def test_generate_stream_ensemble_equals_hf(served: Served, hf: HF) -> None:
    r = requests.post(f"http://{served.http_url}/v2/models/ensemble/generate_stream", stream=True, timeout=60,
                      json={"text_input": PROMPT, "max_tokens": 16, "temperature": 0.0, "stream": True})
    assert r.status_code == 200
    lines = [line.decode() for line in r.iter_lines()]
    events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert len(events) > 2
    assert "".join(e["text_output"] for e in events) == \
        finished_text(TOK.decode(hf("tiny-llama", PROMPT, 16, False)))


def _still_serves(served: Served) -> None:
    ok = generate(served, "llm", {"text_input": "ok", "sampling_parameters": greedy(2)})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("model", ["llm", "ensemble"])
def test_http_infer_is_refused_cleanly_for_decoupled_models(served: Served, model: str) -> None:
    shape = [1] if model == "llm" else [1, 1]
    r = requests.post(f"http://{served.http_url}/v2/models/{model}/infer", timeout=30, json={
        "inputs": [{"name": "text_input", "shape": shape, "datatype": "BYTES", "data": ["hi"]}]})
    assert (r.status_code, r.json()) == \
        (501, {"error": "HTTP end point doesn't support models with decoupled transaction policy"})
    _still_serves(served)


@pytest.mark.parametrize(("body", "status", "error"), [
    (b"{not json", 500, "failed to parse the request JSON buffer: Missing a name for object member. at 1"),
    (b"", 500, "failed to parse the request JSON buffer: The document is empty. at 0"),
    (b"[1, 2]", 500, "attempt to get members for non-object"),
    (b'{"text_input": "hi", "stream": "yes"}', 500,
     "Unable to parse 'data': attempt to access JSON non-boolean as boolean"),
    (b'{"text_input": 5}', 500, "Unable to parse JSON bytes array: attempt to access JSON non-string as string"),
    (b'{"text_input": "hi", "sampling_parameters": {"max_tokens": 3}}', 500,
     "Unable to parse JSON bytes array: attempt to access JSON non-string as string"),
    (b'{"text_input": "hi", "sampling_parameters": "{\\"max_tokens\\": 0}"}', 400,
     "sampling_parameters.max_tokens must be > 0, got 0"),
    (b'{"text_input": ""}', 400, "text_input: prompt is empty"),
])
def test_bad_generate_body_gets_a_clear_error(served: Served, body: bytes, status: int, error: str) -> None:
    r = requests.post(f"http://{served.http_url}/v2/models/llm/generate", data=body, timeout=30,
                      headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()) == (status, {"error": error})
    _still_serves(served)
