"""scripts/gpu_serve_check.{sh,py}, the one-shot GPU serving check: its plan and its verdict on
synthetic results (the check itself needs a tritonserver and runs on the GPU machine)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _helper() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_serve_check", ROOT / "scripts" / "gpu_serve_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check = _helper()
DEPLOY = """model: tiny-llama
disaggregation: true
prefill: {count: 1, devices: [cpu]}
decode: {count: 1, devices: [cpu]}
engine: {block_size: 16, num_blocks: 256, max_num_seqs: 8, max_model_len: 512, dtype: float32}
serving: {max_tokens: 256}
"""


def test_shell_script_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_serve_check.sh")], check=True)


def test_metric_value() -> None:
    page = ('# TYPE pd_kv_transfer_bytes_total counter\npd_kv_transfer_bytes_total{model="llm"} 104448\n'
            'pd_kv_transfer_bytes_total{model="mla_llm"} 7\n')
    assert check.metric_value(page, "pd_kv_transfer_bytes_total", "llm") == 104448.0
    assert check.metric_value(page, "pd_kv_transfer_bytes_total", "other") is None
    page = ('pd_kv_imports_total{path="device",model="decode"} 5\n'
            'pd_kv_imports_total{model="decode",path="host"} 1\n')
    assert check.labelled_value(page, "pd_kv_imports_total", {"model": "decode", "path": "device"}) == 5.0
    assert check.labelled_value(page, "pd_kv_imports_total", {"model": "decode", "path": "host"}) == 1.0
    assert check.labelled_value(page, "pd_kv_imports_total", {"model": "prefill", "path": "host"}) == 0.0


@pytest.fixture
def planned(tmp_path: Path) -> Path:
    (tmp_path / "deploy.yaml").write_text(DEPLOY)
    assert check.main(["plan", "--work", str(tmp_path), "--config", str(tmp_path / "deploy.yaml"),
                       "--max-tokens", "4"]) == 0
    return tmp_path


def test_plan_writes_greedy_llm_bodies_and_a_context_only_probe(planned: Path) -> None:
    plan = json.loads((planned / "prompts.json").read_text())
    assert [p["num_prompt_tokens"] for p in plan["prompts"]] == [2, 24, 32, 51, 297]
    first_blocks = {p["prompt"].encode()[:16] for p in plan["prompts"]}
    assert len(first_blocks) == len(plan["prompts"])  # no prompt is a cached prefix of another
    body = json.loads((planned / "body_3.json").read_text())
    assert json.loads(body["sampling_parameters"]) == {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    assert body["exclude_input_in_output"] is True
    probe = json.loads((planned / "probe.json").read_text())
    assert probe["parameters"]["request_type"] == "context_only" and probe["request_output_len"] > 1


def _fake_results(work: Path, texts: dict[str, str]) -> None:
    """What a served run leaves in the work directory, with the engine's texts given."""
    plan = json.loads((work / "prompts.json").read_text())
    results, total = {}, 0
    for p in plan["prompts"]:
        i, name = p["index"], p["name"]
        results[name] = {"token_ids": [5] * plan["max_tokens"], "text": f"text {name}"}
        (work / f"resp_{i}.code").write_text("200")
        (work / f"resp_{i}.json").write_text(json.dumps(
            {"text_output": texts.get(name, f"text {name}"), "num_output_tokens": plan["max_tokens"]}))
        page = 'pd_kv_transfer_bytes_total{{model="llm"}} {}\n'
        (work / f"metrics_{i}_before.txt").write_text(page.format(total) if total else "")
        total += -(-p["num_prompt_tokens"] // 16) * 16 * 2048  # whole blocks: the decode pulls blocks
        (work / f"metrics_{i}_after.txt").write_text(page.format(total))
    (work / "ref.json").write_text(json.dumps({"kv_bytes_per_token": 2048, "kv_block_size": 16, "results": results}))
    (work / "ready").write_text("")
    (work / "server.log").write_text("I1204 model_lifecycle.cc] successfully loaded 'decode'\n")


def test_compare_passes_on_equal_texts_and_moved_kv(planned: Path) -> None:
    _fake_results(planned, {})
    assert check.main(["compare", "--work", str(planned), "--device", "cpu",
                       "--out", str(planned / "serve.json")]) == 0
    result = json.loads((planned / "serve.json").read_text())
    assert result["verdict"] == "PASS" and result["kv_bytes_exact_every_request"]
    assert [r["kv_bytes_moved"] for r in result["requests"]] == [b * 16 * 2048 for b in (1, 2, 2, 4, 19)]


def test_compare_fails_on_a_different_text_a_kv_failure_or_workers_off_the_gpu(planned: Path) -> None:
    _fake_results(planned, {"long": "something else"})
    assert check.main(["compare", "--work", str(planned), "--out", str(planned / "a.json")]) == 1
    assert not json.loads((planned / "a.json").read_text())["checks"]["greedy_equals_engine"]
    _fake_results(planned, {})
    (planned / "server.log").write_text("WARNING KV pull of r1 failed (shm): deadline\n")
    assert check.main(["compare", "--work", str(planned), "--out", str(planned / "b.json")]) == 1
    assert json.loads((planned / "b.json").read_text())["log_failures"]
    (planned / "server.log").write_text("")
    (planned / "gpu_users.json").write_text(json.dumps(
        [{"pid": 1, "model": "prefill", "nvidia_fds": ["/dev/nvidia0"]},
         {"pid": 2, "model": "decode", "nvidia_fds": []}]))
    assert check.main(["compare", "--work", str(planned), "--device", "cuda:0",
                       "--out", str(planned / "c.json")]) == 1
    c = json.loads((planned / "c.json").read_text())
    assert c["models_on_gpu"] == ["prefill"] and not c["checks"]["workers_on_gpu"]
