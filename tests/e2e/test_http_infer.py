"""Non-decoupled public models (deployment ``serving.decoupled: false``, tensorrtllm_backend's
``decoupled_mode=false``) through a real tritonserver: HTTP and gRPC ``infer`` return the full
result in one response, equal to the single-process engine's greedy output; a bad request gets
its own 400 naming the field while the requests beside it succeed; ``stream=true`` is
INVALID_ARG naming ``stream``. One colocated tiny-llama server (1 worker) for the module.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import requests
from expected_text import finished_text

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from backends.launch.deploy import Deployment, write_repository
from backends.launch.install import find_triton
from backends.launch.launcher import LaunchSpec, ServerPorts, TritonServer, free_ports
from backends.launch.layout import layout_backend_dir
from backends.serving.engine_spec import EngineSpec

pytestmark = pytest.mark.e2e
TOK = byte_level_tokenizer()
NUM_BLOCKS = 64
PROMPT = "The capital of France is"
STREAM_ERROR = ("stream: true needs a decoupled model; {model} is deployed with serving.decoupled: false "
                "(send stream=false, or deploy it decoupled)")


@dataclass(frozen=True, slots=True)
class Server:
    http_url: str
    grpc_url: str


def _stub_pids(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,pgid,comm"], capture_output=True, text=True, check=True)
    return [int(line.split()[0]) for line in out.stdout.splitlines()[1:]
            if line.split()[1] == str(pgid) and "triton" in line]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    try:
        install = find_triton()
    except RuntimeError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    root = tmp_path_factory.mktemp("triton-infer")
    engine = EngineSpec(num_blocks=NUM_BLOCKS, max_num_seqs=8, max_model_len=256)
    write_repository(Deployment(model="tiny-llama", disaggregation=False, max_tokens=64, engine=engine, decoupled=False),
                     root / "models")
    http_port, grpc_port, metrics_port = free_ports(3)
    ports = ServerPorts(http_port, grpc_port, metrics_port)
    triton = TritonServer(LaunchSpec(install, root / "models", layout_backend_dir(install, root / "backends"),
                                     ports), root / "tritonserver.log")
    triton.start()
    pgid = triton.pid
    try:
        triton.wait_ready(300)
        yield Server(triton.http_url, triton.grpc_url)
    finally:
        triton.close()
        assert pgid is not None and _stub_pids(pgid) == []


@pytest.fixture(scope="module")
def reference() -> LLMEngine:
    return LLMEngine("tiny-llama", EngineConfig(num_blocks=NUM_BLOCKS, max_model_len=256))


def engine_result(engine: LLMEngine, prompt: str, max_tokens: int) -> tuple[str, str, int]:
    """(text, finish_reason, num_output_tokens) of the single-process engine, greedy; the text as
    the server sends it (expected_text.finished_text)."""
    [result] = engine.generate([TOK.encode(prompt)], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return finished_text(TOK.decode(list(result.output_token_ids))), str(result.finish_reason), len(result.output_token_ids)


def _inputs(module: Any, values: dict[str, np.ndarray]) -> list[Any]:
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, value in values.items():
        tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def _llm_inputs(prompt: str, max_tokens: int) -> dict[str, np.ndarray]:
    return {"text_input": np.array([prompt.encode()], dtype=np.object_),
            "sampling_parameters": np.array([json.dumps({"max_tokens": max_tokens, "temperature": 0}).encode()],
                                            dtype=np.object_),
            "return_finish_reason": np.array([True]), "return_num_output_tokens": np.array([True])}


def _ensemble_inputs(prompt: str, max_tokens: int) -> dict[str, np.ndarray]:
    return {"text_input": np.array([[prompt.encode()]], dtype=np.object_),
            "max_tokens": np.array([[max_tokens]], dtype=np.int32),
            "temperature": np.array([[0.0]], dtype=np.float32),
            "exclude_input_in_output": np.array([[True]])}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_llm_infer_equals_engine(server: Server, reference: LLMEngine, protocol: str) -> None:
    """vllm_backend's default for a non-streamed request: the prompt, then the generated text."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module: Any = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    result = client.infer("llm", _inputs(module, _llm_inputs(PROMPT, 12)))
    client.close()
    text, reason, num_tokens = engine_result(reference, PROMPT, 12)
    assert (result.as_numpy("text_output").tolist(), result.as_numpy("finish_reason").tolist(),
            result.as_numpy("num_output_tokens").tolist()) == \
        ([(PROMPT + text).encode()], [reason.encode()], [num_tokens])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ensemble_infer_has_trtllm_shapes_and_equals_engine(server: Server, reference: LLMEngine,
                                                            protocol: str) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module: Any = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    values = {**_ensemble_inputs(PROMPT, 16), "return_log_probs": np.array([[True]])}
    result = client.infer("ensemble", _inputs(module, values))
    client.close()
    text, reason, num_tokens = engine_result(reference, PROMPT, 16)
    assert (result.as_numpy("text_output").tolist(), result.as_numpy("finish_reason").tolist(),
            result.as_numpy("num_output_tokens").tolist(), result.as_numpy("output_log_probs").shape) == \
        ([[text.encode()]], [[reason.encode()]], [[num_tokens]], (1, 1, num_tokens))


def _http_infer(server: Server, model: str, inputs: list[dict[str, Any]]) -> requests.Response:
    return requests.post(f"http://{server.http_url}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=60)


def _ensemble_json(prompt: str, max_tokens: int) -> list[dict[str, Any]]:
    return [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]},
            {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]},
            {"name": "temperature", "shape": [1, 1], "datatype": "FP32", "data": [0.0]},
            {"name": "exclude_input_in_output", "shape": [1, 1], "datatype": "BOOL", "data": [True]}]


def _text(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    [output] = [o for o in response.json()["outputs"] if o["name"] == "text_output"]
    return str(output["data"][0])


def test_bad_http_infer_is_400_naming_the_field_and_the_next_succeeds(server: Server,
                                                                      reference: LLMEngine) -> None:
    r = _http_infer(server, "llm", [
        {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
        {"name": "sampling_parameters", "shape": [1], "datatype": "BYTES", "data": ['{"max_tokens": 0}']}])
    assert (r.status_code, r.json()) == (400, {"error": "sampling_parameters.max_tokens must be > 0, got 0"})
    assert _text(_http_infer(server, "ensemble", _ensemble_json(PROMPT, 8))) == engine_result(reference, PROMPT, 8)[0]


def test_concurrent_requests_each_get_their_own_response(server: Server, reference: LLMEngine) -> None:
    """Requests queued together (one dynamic batch of ``ensemble`` when they meet) each get their
    own answer; the bad one (max_tokens 0) fails alone."""
    prompts = [f"{PROMPT} {i}" for i in range(4)]
    bodies = [_ensemble_json(p, 6) for p in prompts] + [_ensemble_json(PROMPT, 0)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: _http_infer(server, "ensemble", body), bodies))
    assert [_text(r) for r in responses[:4]] == [engine_result(reference, p, 6)[0] for p in prompts]
    assert (responses[4].status_code, responses[4].json()) == (400, {"error": "max_tokens must be > 0, got 0"})


@pytest.mark.parametrize("model", ["llm", "ensemble"])
def test_stream_true_is_invalid_arg_naming_stream(server: Server, model: str) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    values = _llm_inputs(PROMPT, 4) if model == "llm" else _ensemble_inputs(PROMPT, 4)
    values["stream"] = np.array([True]) if model == "llm" else np.array([[True]])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, _inputs(grpcclient, values))
    client.close()
    assert (info.value.status(), info.value.message()) == \
        ("StatusCode.INVALID_ARGUMENT", STREAM_ERROR.format(model=model))
