"""Multi-turn prefix reuse through a real tritonserver (1 prefill + 1 decode, ``ensemble``).

Turn 1 (a prompt no node holds) runs disaggregated: the prefill node computes and stores the
prompt's full blocks; the decode node imports them, stores them as the head of one chain and
extends it with the full blocks of the reply it computes (the last generated token's KV is
never computed: no step follows it). Turn 2 = turn-1 prompt + reply + new text: the decode node
holds a strictly longer prefix than the prefill node, so the Supervisor plans it locally there
and the engine loads that chain (full blocks, fewer than the prompt's tokens).
The byte-level tokenizer maps text to its UTF-8 bytes (no BOS), so every count is exact.
"""

from __future__ import annotations

import queue
import time
from functools import partial
from typing import Any

import numpy as np
import pytest
from disagg_server import NUM_BLOCKS, DisaggServer, metric, model_of

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer

pytestmark = pytest.mark.e2e
pytest_plugins = ("disagg_plugin",)  # the session's one disaggregated server: disagg_served

TOK = byte_level_tokenizer()
BLOCK_SIZE = 16
MODEL_ID = "tiny-llama"
# 47 tokens (2 full blocks + 15); no other e2e test sends it. Its first 7 greedy tokens are
# ASCII ("Dggg45#", no EOS), so the reply's text re-encodes to exactly the generated ids.
TURN1 = "Multi-turn chat over Triton, user turn 01" + " " * 6
REPLY_TOKENS = 7
NEW_TEXT = " and then?"
TURN2_TOKENS = 8
OUTPUTS = ("text_output", "num_input_tokens", "num_output_tokens", "kv_cache_reused_blocks")


def _infer(served: DisaggServer, prompt: str, max_tokens: int) -> dict[str, np.ndarray]:
    """One non-streaming ``ensemble`` request with [1, 1] TensorRT-LLM tensors over gRPC (the
    model is decoupled: gRPC streaming carries it); the final response's outputs."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    values = {"text_input": np.array([[prompt.encode()]], dtype=np.object_),
              "max_tokens": np.array([[max_tokens]], dtype=np.int32),
              "temperature": np.array([[0.0]], dtype=np.float32),
              "exclude_input_in_output": np.array([[True]]),
              "return_kv_cache_reuse_stats": np.array([[True]])}
    inputs = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(served.grpc_url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    try:
        client.async_stream_infer("ensemble", inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS])
        result, error = results.get(timeout=60)
        assert error is None, error
    finally:
        client.stop_stream()
        client.close()
    return {n: result.as_numpy(n) for n in OUTPUTS}


def _reference(prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of a fresh single-process engine (no prefix cache, no hooks)."""
    engine = LLMEngine(MODEL_ID, EngineConfig(num_blocks=NUM_BLOCKS, max_model_len=512))
    [result] = engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return list(result.output_token_ids)


def _wait_master_holds(served: DisaggServer, token_ids: list[int], expected: dict[str, int]) -> dict[str, int]:
    """Polls the master's index until each node holds ``expected`` blocks of ``token_ids``
    (workers forward their store's events from their own thread: the index lags a little)."""
    from kvbridge.hashing import hash_blocks

    hashes = list(hash_blocks(token_ids, BLOCK_SIZE, MODEL_ID))
    matches: dict[str, int] = {}
    with served.master_client() as client:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and matches != expected:
            matches = {model_of(m.node_id): m.num_blocks for m in client.lookup(hashes) if m.num_blocks}
            time.sleep(0.05)
    return matches


def _prefix_hits_after(served: DisaggServer, before: float) -> float:
    """The ensemble's pd_prefix_hit_tokens_total once this request's metrics are recorded
    (the orchestrator records them just after the final response)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and metric(served, "pd_prompt_tokens_total", "ensemble") == before:
        time.sleep(0.05)
    return metric(served, "pd_prefix_hit_tokens_total", "ensemble")


def test_second_turn_reuses_the_decode_nodes_prompt_and_reply(disagg_served: DisaggServer) -> None:
    served = disagg_served
    turn1_ids = TOK.encode(TURN1)
    reply_ids = _reference(turn1_ids, REPLY_TOKENS)
    assert (len(turn1_ids), TOK.encode(TOK.decode(reply_ids))) == (47, reply_ids)

    hits0 = metric(served, "pd_prefix_hit_tokens_total", "ensemble")
    prompts0 = metric(served, "pd_prompt_tokens_total", "ensemble")
    first = _infer(served, TURN1, REPLY_TOKENS)
    assert first["text_output"].tolist() == [[TOK.decode(reply_ids).encode()]]
    assert (first["num_input_tokens"].tolist(), first["num_output_tokens"].tolist(),
            first["kv_cache_reused_blocks"].tolist()) == ([[47]], [[REPLY_TOKENS]], [[0]])
    hits1 = _prefix_hits_after(served, prompts0)
    assert hits1 - hits0 == 0

    # KV exists for prompt + reply minus the last reply token: 53 tokens, 3 full blocks on the
    # decode node; the prefill node holds the prompt's 2.
    held = len(turn1_ids) + REPLY_TOKENS - 1
    assert _wait_master_holds(served, turn1_ids + reply_ids, {"prefill": 2, "decode": held // BLOCK_SIZE}) == \
        {"prefill": 2, "decode": 3}

    turn2 = TURN1 + TOK.decode(reply_ids) + NEW_TEXT
    turn2_ids = TOK.encode(turn2)
    assert turn2_ids[:held] == (turn1_ids + reply_ids)[:held] and len(turn2_ids) == 64
    expected_tokens = min(held, len(turn2_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
    reference = _reference(turn2_ids, TURN2_TOKENS)
    prompts1 = metric(served, "pd_prompt_tokens_total", "ensemble")
    second = _infer(served, turn2, TURN2_TOKENS)
    assert second["text_output"].tolist() == [[TOK.decode(reference).encode()]]
    assert (second["num_input_tokens"].tolist(), second["num_output_tokens"].tolist(),
            second["kv_cache_reused_blocks"].tolist()) == ([[64]], [[len(reference)]],
                                                           [[expected_tokens // BLOCK_SIZE]])
    assert expected_tokens // BLOCK_SIZE == 3
    assert _prefix_hits_after(served, prompts1) - hits1 == expected_tokens == 48
