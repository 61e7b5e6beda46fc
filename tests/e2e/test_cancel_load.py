"""Client cancels under load (issue 8): concurrent gRPC streams against ``llm`` on the session's
disaggregated server (1 prefill + 1 decode), a seeded half of them cancelled by the client
after 1..12 chunks (``stop_stream(cancel_requests=True)``), then the server must be whole:
no process lost, every request accounted for, every non-cancelled stream's final response
carrying the engine's greedy text, a fresh request answered with the engine's text, and every
KV block of both workers free again.

On the code before the fix (an abandoned BLS stream was drained on a pool thread that dropped
the iterator microseconds after its final response, so python_backend's cleanup thread
destroyed it without the GIL) this load kills the llm stub; see scripts/stress_cancels.py for
the longer run.
"""

from __future__ import annotations

import json

import pytest
import requests
from disagg_server import NUM_BLOCKS, DisaggServer, wait_blocks_free
from expected_text import finished_text
from procs import group_members

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from backends.launch.cancel_load import LoadConfig, run_load_in_child

pytestmark = pytest.mark.e2e
pytest_plugins = ("disagg_plugin",)  # the session's one disaggregated server: disagg_served
TOK = byte_level_tokenizer()
# Prompts no other module sends (modules sharing the server see each other's cached prefixes).
PROMPTS = tuple(f"Cancel-load prompt {i}: stop generating, the tab was closed. " * (1 + i % 2) for i in range(8))
FRESH = "After the cancels, one more question"
MAX_TOKENS = 32
CONFIG = LoadConfig(PROMPTS, num_streams=32, cancel_fraction=0.5, max_cancel_chunks=12, max_tokens=MAX_TOKENS,
                    duration_s=120.0, request_timeout_s=60.0, seed=8, requests_per_stream=4)


@pytest.fixture(scope="module")
def engine_texts() -> dict[str, str]:
    engine = LLMEngine("tiny-llama", EngineConfig(num_blocks=NUM_BLOCKS, max_model_len=512))
    prompts = (*PROMPTS, FRESH)
    results = engine.generate([TOK.encode(p) for p in prompts],
                              SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    return {p: finished_text(TOK.decode(list(r.output_token_ids))) for p, r in zip(prompts, results, strict=True)}


def stub_pids(served: DisaggServer) -> list[int]:
    assert served.server.pid is not None
    return sorted(int(line.split()[0]) for line in group_members(served.server.pid) if "triton" in line)


def test_client_cancels_under_load_leave_the_server_whole(disagg_served: DisaggServer,
                                                           engine_texts: dict[str, str]) -> None:
    before = stub_pids(disagg_served)
    report = run_load_in_child(disagg_served.grpc_url, CONFIG)  # this process hosts the master

    # Every planned request ended once, and none with an error or without a final response.
    assert [(o.stream, o.index) for o in report.outcomes] == [
        (s, i) for s in range(CONFIG.num_streams) for i in range(4)]
    assert [(o.stream, o.index, o.kind, o.error) for o in report.outcomes if o.kind in ("error", "hung")] == []
    planned_cancels = [o for o in report.outcomes if o.planned.cancel_after_chunks is not None]
    assert len(planned_cancels) == 80  # the seed's plan: 80 of 128
    # Every non-cancelled stream got its final response with the engine's text. Chunk counts
    # vary: tokens that reach a busy orchestrator or worker together go out as one response.
    completed = [o for o in report.outcomes if o.kind == "completed"]
    assert [(o.stream, o.index) for o in completed if o.text != engine_texts[o.planned.prompt]] == []
    # A planned cancel after k chunks lands when the stream had k chunks before its final one
    # (what the client saw until then is a prefix of the engine's text); a stream whose final
    # response came first completed in at most k chunks.
    for o in report.outcomes:
        k = o.planned.cancel_after_chunks
        if o.kind == "cancelled":
            assert k is not None and o.num_chunks == k and engine_texts[o.planned.prompt].startswith(o.text)
        else:
            assert o.kind == "completed" and (k is None or o.num_chunks <= k), (o.stream, o.index, k, o.num_chunks)
    cancelled = sum(o.kind == "cancelled" for o in report.outcomes)
    assert cancelled >= len(planned_cancels) // 4, f"only {cancelled} of {len(planned_cancels)} cancels landed"

    # The server is whole: the same stub processes, ready, answering with the engine's text.
    assert stub_pids(disagg_served) == before
    assert requests.get(f"http://{disagg_served.http_url}/v2/health/ready", timeout=10).status_code == 200
    body = {"text_input": FRESH, "exclude_input_in_output": True,
            "sampling_parameters": json.dumps({"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})}
    r = requests.post(f"http://{disagg_served.http_url}/v2/models/llm/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == engine_texts[FRESH]
    # No KV block leaked on either worker.
    assert wait_blocks_free(disagg_served) == {"prefill": NUM_BLOCKS, "decode": NUM_BLOCKS}
