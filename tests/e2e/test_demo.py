"""``triton-pd demo`` as a user runs it: a subprocess that serves the default model (the real
SmolLM2-135M-Instruct), streams one reply to a chat prompt (which ``llm`` renders with the model's template) and stops,
saying what it does on stderr."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from expected_text import finished_text
from procs import group_members

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampling_params import SamplingParams
from backends.launch.demo import chat_prompt
from backends.launch.deploy import DEFAULT_MODEL
from backends.launch.install import find_triton, repo_root

pytestmark = pytest.mark.e2e
PROMPT = "What is the capital of France?"
MAX_TOKENS = 16


def test_demo_streams_the_greedy_reply_and_leaves_no_process() -> None:
    try:
        find_triton()
    except RuntimeError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    # The console script `triton-pd` is backends.cli:main; the module form needs no install.
    proc = subprocess.run([sys.executable, "-m", "backends.cli", "demo", "--prompt", PROMPT,
                           "--max-tokens", str(MAX_TOKENS)], cwd=repo_root(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    engine = LLMEngine(DEFAULT_MODEL, EngineConfig(num_blocks=64, max_model_len=512))
    tok = engine.tokenizer
    [ref] = engine.generate([tok.encode(chat_prompt(DEFAULT_MODEL, PROMPT))],
                            SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    assert proc.stdout == finished_text(tok.decode(list(ref.output_token_ids))) + "\n"
    assert proc.stdout == "The capital of France is Paris.\n"
    assert f"{len(ref.output_token_ids)} tokens, finish_reason stop" in proc.stderr
    assert re.search(r"triton-pd demo \[ *[0-9.]+s\]: stopped$", proc.stderr.rstrip())
    # progress with elapsed times; neither tritonserver's log nor its CPU-only CUDA error
    assert "loading 2 worker(s) (decode, prefill) and 2 public model(s) (ensemble, llm)" in proc.stderr
    for model in ("prefill", "decode", "llm", "ensemble"):
        assert re.search(rf"\[ *[0-9.]+s\]: loaded {model} \([1-4]/4, [0-9.]+ s\)", proc.stderr), model
    assert not re.search(r"^[IWE]\d{4} ", proc.stderr, re.MULTILINE)
    assert "CudaDriverHelper" not in proc.stderr
    [pid] = re.findall(r"tritonserver pid (\d+) ready", proc.stderr)
    assert group_members(int(pid)) == []
