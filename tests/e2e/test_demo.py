"""``triton-pd demo`` as a user runs it: a subprocess that serves, streams one reply and stops."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from procs import group_members

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from backends.serving.install import find_triton, repo_root

pytestmark = pytest.mark.e2e
PROMPT = "The capital of France is"
MAX_TOKENS = 8


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
    engine = LLMEngine("tiny-llama", EngineConfig(num_blocks=64, max_model_len=512))
    tok = byte_level_tokenizer()
    [ref] = engine.generate([tok.encode(PROMPT)], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    assert proc.stdout == tok.decode(list(ref.output_token_ids)) + "\n"
    assert f"{MAX_TOKENS} tokens, finish_reason length" in proc.stderr
    assert proc.stderr.rstrip().endswith("triton-pd demo: stopped")
    [pid] = re.findall(r"tritonserver pid (\d+) ready", proc.stderr)
    assert group_members(int(pid)) == []
