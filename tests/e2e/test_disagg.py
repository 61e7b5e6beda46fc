"""Disaggregated serving end to end: 1 prefill + 1 decode worker behind llm / ensemble.

One real tritonserver for this module (tests/e2e/disagg_server.py), a real kvbridge master,
KV handed from the prefill worker's shared-memory pool to the decode worker by handle.
Oracles: the single-process engine and HF transformers on the same preset weights.
"""

from __future__ import annotations

import json
import queue
import re
import time
from typing import Any

import pytest
import requests
import torch
from disagg_server import (
    NUM_BLOCKS,
    DisaggServer,
    grpc_stream,
    is_final,
    metric,
    model_of,
    wait_blocks_free,
)
from expected_text import finished_text

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.loader import export_preset
from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from kvbridge.master.messages import LoadReport

pytestmark = pytest.mark.e2e
pytest_plugins = ("disagg_plugin",)  # the session's one disaggregated server: disagg_served
TOK = byte_level_tokenizer()
PROMPT = "Disaggregated prefill hands its KV cache to decode."  # 51 tokens: 3 full blocks + 3
BYTES_PER_TOKEN_ALL_LAYERS = 4 * 128 * 4  # tiny-llama: 4 layers x kv_width 128 x float32
MAX_NEW = 12


@pytest.fixture(scope="module")
def served(disagg_served: DisaggServer) -> DisaggServer:
    return disagg_served


@pytest.fixture(scope="module")
def engine_tokens() -> list[int]:
    engine = LLMEngine("tiny-llama", EngineConfig(num_blocks=NUM_BLOCKS, max_model_len=512))
    [result] = engine.generate([TOK.encode(PROMPT)], SamplingParams(max_tokens=MAX_NEW, temperature=0.0,
                                                                    ignore_eos=True))
    return list(result.output_token_ids)


@pytest.fixture(scope="module")
def hf_tokens(tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    transformers = pytest.importorskip("transformers")
    directory = export_preset("tiny-llama", tmp_path_factory.mktemp("hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    prompt = TOK.encode(PROMPT)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                             do_sample=False)
    return [int(t) for t in out[0, len(prompt):]]


def generate(served: DisaggServer, model: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"http://{served.http_url}/v2/models/{model}/generate", json=body, timeout=60)


def greedy(max_tokens: int) -> str:
    return json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})


def test_llm_greedy_equals_engine_and_hf(served: DisaggServer, engine_tokens: list[int],
                                         hf_tokens: list[int]) -> None:
    assert engine_tokens == hf_tokens
    r = generate(served, "llm", {"text_input": PROMPT, "sampling_parameters": greedy(MAX_NEW),
                                 "exclude_input_in_output": True, "return_num_output_tokens": True})
    assert r.status_code == 200, r.text
    assert (r.json()["text_output"], r.json()["num_output_tokens"]) == \
        (finished_text(TOK.decode(hf_tokens)), MAX_NEW)


def test_ensemble_greedy_equals_engine_and_hf(served: DisaggServer, hf_tokens: list[int]) -> None:
    r = generate(served, "ensemble", {"text_input": PROMPT, "max_tokens": MAX_NEW, "temperature": 0.0,
                                      "exclude_input_in_output": True})
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == finished_text(TOK.decode(hf_tokens))


def test_transfer_metrics_are_exact_in_bytes(served: DisaggServer) -> None:
    bytes_before = metric(served, "pd_kv_transfer_bytes_total", "llm")
    seconds_before = metric(served, "pd_kv_transfer_seconds_sum", "llm")
    imports_before = settled_imports(served)
    # A prompt no node holds: once a decode node stored a prompt's chain, a repeat of it is
    # planned locally there (fully cached), with no transfer.
    fresh = PROMPT.lower()
    r = generate(served, "llm", {"text_input": fresh, "sampling_parameters": greedy(4)})
    assert r.status_code == 200, r.text
    # the decode node pulls whole blocks, the ones it lacks: all 4 (3 full + the partial one)
    expected = -(-len(TOK.encode(fresh)) // 16) * 16 * BYTES_PER_TOKEN_ALL_LAYERS
    deadline = time.monotonic() + 5  # the orchestrator records metrics just after the final response
    while time.monotonic() < deadline and metric(served, "pd_kv_transfer_bytes_total", "llm") == bytes_before:
        time.sleep(0.05)
    assert metric(served, "pd_kv_transfer_bytes_total", "llm") - bytes_before == expected == 131072
    assert metric(served, "pd_kv_transfer_seconds_sum", "llm") > seconds_before
    # the decode worker counts the import by path: on CPU it came over the host pool
    while time.monotonic() < deadline and kv_imports(served, "decode", "host") == imports_before:
        time.sleep(0.05)
    assert kv_imports(served, "decode", "host") == imports_before + 1
    assert kv_imports(served, "decode", "device") == 0


def settled_imports(served: DisaggServer) -> float:
    """The decode's host import count once it stopped moving (the shared server's earlier
    requests may still be reaching a metric refreshed every 0.2 s)."""
    previous, deadline = -1.0, time.monotonic() + 5
    while time.monotonic() < deadline:
        now = kv_imports(served, "decode", "host")
        if now == previous:
            return now
        previous = now
        time.sleep(0.5)
    return previous


def kv_imports(served: DisaggServer, model: str, path: str) -> float:
    text = requests.get(served.metrics_url, timeout=10).text
    labels = {"model": model, "path": path}
    for line in text.splitlines():
        if line.startswith("pd_kv_imports_total{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.index("}")]))
            if found == labels:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# A prompt no other test sends: no node holds it, so the plan is prefill -> decode (a prompt the
# decode node already holds runs there alone, where two early tokens may share a response).
FRESH_PROMPT = "Prefill streams the first token before decode starts."


def test_first_token_streams_from_prefill_before_decode_finishes(served: DisaggServer) -> None:
    engine = LLMEngine("tiny-llama", EngineConfig(num_blocks=NUM_BLOCKS, max_model_len=512))
    [result] = engine.generate([TOK.encode(FRESH_PROMPT)], SamplingParams(max_tokens=1, temperature=0.0,
                                                                          ignore_eos=True))
    first_token = list(result.output_token_ids)
    assert TOK.decode(first_token).isprintable()  # one whole character: it goes out on its own
    client, results = grpc_stream(served, [FRESH_PROMPT], {"max_tokens": 64, "temperature": 0, "ignore_eos": True})
    first, error, t_first = results.get(timeout=60)
    assert error is None, error
    last, t_last = first, t_first
    while not is_final(last):
        last, error, t_last = results.get(timeout=60)
        assert error is None, error
    client.stop_stream()
    client.close()
    assert first.as_numpy("text_output")[0].decode() == TOK.decode(first_token)
    assert int(first.as_numpy("num_output_tokens")[0]) == 1
    assert t_last > t_first


def test_workers_register_with_the_master(served: DisaggServer) -> None:
    with served.master_client() as client:
        deadline = time.monotonic() + 10
        nodes = {model_of(n.node_id): n for n in client.nodes()}
        while time.monotonic() < deadline and nodes["decode"].load != LoadReport(0, 0, NUM_BLOCKS):
            time.sleep(0.2)  # heartbeats carry the load once a second
            nodes = {model_of(n.node_id): n for n in client.nodes()}
        assert sorted(nodes) == ["decode", "prefill"]
        assert nodes["decode"].load == LoadReport(queue_len=0, num_running=0, num_free_blocks=NUM_BLOCKS)
        generate(served, "llm", {"text_input": PROMPT, "sampling_parameters": greedy(2)})
        hashes = _prompt_hashes(PROMPT)
        deadline = time.monotonic() + 10
        matches: dict[str, int] = {}
        while time.monotonic() < deadline and matches.get("prefill") != len(hashes):
            matches = {model_of(m.node_id): m.num_blocks for m in client.lookup(hashes)}
            time.sleep(0.1)
        assert matches.get("prefill") == len(hashes) == 3


def _prompt_hashes(prompt: str) -> list[bytes]:
    from kvbridge.hashing import hash_blocks

    return list(hash_blocks(TOK.encode(prompt), 16, "tiny-llama"))


def _cancelled_status(results: queue.Queue[Any]) -> str:
    """The status of the error the client's stream reports once it was cancelled."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, error, _ = results.get(timeout=30)
        if error is not None:
            return str(error.status())
    raise AssertionError("the cancelled stream reported no error")


def test_cancel_mid_stream_frees_blocks_on_both_workers(served: DisaggServer) -> None:
    client, results = grpc_stream(served, ["cancel me " * 3], {"max_tokens": 200, "temperature": 0,
                                                               "ignore_eos": True})
    _, error, _ = results.get(timeout=60)
    assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    assert _cancelled_status(results) == "StatusCode.CANCELLED"
    assert wait_blocks_free(served) == {"prefill": NUM_BLOCKS, "decode": NUM_BLOCKS}
    assert generate(served, "llm", {"text_input": "after", "sampling_parameters": greedy(3)}).status_code == 200


def test_32_concurrent_streams_finish_with_every_token(served: DisaggServer) -> None:
    client, results = grpc_stream(served, [f"concurrent request {i:02d} padding" for i in range(32)],
                                  {"max_tokens": 8, "temperature": 0, "ignore_eos": True})
    tokens = dict.fromkeys(range(32), 0)
    finals: set[int] = set()
    deadline = time.monotonic() + 180
    while len(finals) < 32 and time.monotonic() < deadline:
        result, error, _ = results.get(timeout=120)
        assert error is None, error
        rid = int(result.get_response().id)
        out = result.as_numpy("num_output_tokens")
        if out is not None:
            tokens[rid] += int(out.sum())
        if is_final(result):
            finals.add(rid)
    client.stop_stream()
    client.close()
    assert finals == set(range(32))
    assert tokens == dict.fromkeys(range(32), 8)
    assert wait_blocks_free(served) == {"prefill": NUM_BLOCKS, "decode": NUM_BLOCKS}


def _mismatched_handle() -> bytes:
    from kvbridge.handle import KVHandle, KVLayoutSpec

    layout = KVLayoutSpec("float32", 4, 64, 128, 512)
    return KVHandle("r", (), 51, "127.0.0.1:9", "prefill", "active", layout, "shm", "", (0,), (1,)).to_bytes()


@pytest.mark.parametrize(("handle", "field"), [
    (b"\x93not a handle", "context_phase_params: data: undecodable KV handle"),
    (b"\x80", "context_phase_params: version: unsupported KV handle version None"),
    (_mismatched_handle(), "context_phase_params: KV layout mismatch in layout.block_size: handle has 64, "
                           "expected 16"),
], ids=["undecodable", "no-version", "layout-mismatch"])
def test_corrupt_context_phase_params_is_invalid_arg(served: DisaggServer, handle: bytes, field: str) -> None:
    body = {"input_ids": TOK.encode(PROMPT), "prior_output_ids": [65], "context_phase_params": list(handle),
            "parameters": {"request_type": "generation_only"}}
    r = generate(served, "decode", body)
    assert r.status_code == 400, r.text  # INVALID_ARG
    assert field in r.json()["error"]
    ok = generate(served, "llm", {"text_input": "still serving", "sampling_parameters": greedy(3)})
    assert ok.status_code == 200
