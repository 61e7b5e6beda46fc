"""Two tritonservers, one kvbridge master (issue 13): a prompt computed on server A is reused
on server B — B's prefill worker pulls A's blocks instead of recomputing them, and B's answer
equals A's. Server A is the session's shared disaggregated server; B joins its master."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from disagg_server import DisaggServer, metric, model_of, serve_disaggregated

from backends.engine.tokenizer import byte_level_tokenizer
from kvbridge.hashing import hash_blocks

pytest_plugins = ["disagg_plugin"]
pytestmark = pytest.mark.e2e

TOK = byte_level_tokenizer()
PROMPT = ("Cluster-wide reuse: this system prompt is computed once on server A and then served "
          "from its KV on server B, which never saw it before, block by block. ") * 2  # 304 tokens
FULL_BLOCKS = (len(TOK.encode(PROMPT)) - 1) // 16


@pytest.fixture(scope="module")
def server_b(disagg_served: DisaggServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DisaggServer]:
    yield from serve_disaggregated(Path(tmp_path_factory.mktemp("server_b")), master=disagg_served.master)


def generate(served: DisaggServer, prompt: str) -> dict[str, object]:
    body = {"text_input": prompt, "exclude_input_in_output": True, "return_num_output_tokens": True,
            "sampling_parameters": json.dumps({"max_tokens": 8, "temperature": 0, "ignore_eos": True})}
    r = requests.post(f"http://{served.http_url}/v2/models/llm/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    result: dict[str, object] = r.json()
    return result


def remote_imports(served: DisaggServer, model: str) -> float:
    text = requests.get(served.metrics_url, timeout=10).text
    for line in text.splitlines():
        if line.startswith("pd_kv_imports_total{") and f'model="{model}"' in line and 'path="remote"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def held_by(served: DisaggServer, prompt: str) -> dict[str, int]:
    """Node id -> leading blocks of ``prompt`` it holds, per the shared master."""
    hashes = list(hash_blocks(TOK.encode(prompt), 16, "tiny-llama"))
    with served.master_client() as client:
        return {m.node_id: m.num_blocks for m in client.lookup(hashes) if m.num_blocks}


def test_a_prompt_computed_on_a_is_reused_on_b(disagg_served: DisaggServer, server_b: DisaggServer) -> None:
    on_a = generate(disagg_served, PROMPT)
    deadline = time.monotonic() + 10  # workers forward their index from their own thread
    while time.monotonic() < deadline and max(held_by(disagg_served, PROMPT).values(), default=0) < FULL_BLOCKS:
        time.sleep(0.05)
    nodes = {n.node_id for n in disagg_served.master_client().nodes()}
    assert sorted(model_of(n) for n in nodes) == ["decode", "decode", "prefill", "prefill"]
    assert len({n.partition("/")[0] for n in nodes}) == 2  # two servers, unique node ids
    hits_before = metric(server_b, "pd_prefix_hit_tokens_total", "llm")
    pulls_before = remote_imports(server_b, "prefill")
    on_b = generate(server_b, PROMPT)
    assert on_b == on_a
    deadline = time.monotonic() + 5  # metrics are recorded just after the final response
    while time.monotonic() < deadline and metric(server_b, "pd_prefix_hit_tokens_total", "llm") == hits_before:
        time.sleep(0.05)
    assert metric(server_b, "pd_prefix_hit_tokens_total", "llm") - hits_before == FULL_BLOCKS * 16 == 288
    while time.monotonic() < deadline and remote_imports(server_b, "prefill") == pulls_before:
        time.sleep(0.05)
    assert remote_imports(server_b, "prefill") == pulls_before + 1
