"""Every bad input gets a ValueError whose message names the field and the value."""

from __future__ import annotations

import re

import pytest
from conftest import LoadedFn

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.kv_transfer import TensorKVSource
from backends.engine.sampling_params import SamplingParams

BAD_PARAMS = [
    ({"max_tokens": 0}, "max_tokens must be > 0, got 0"),
    ({"max_tokens": -3}, "max_tokens must be > 0, got -3"),
    ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_k": -1}, "top_k must be >= 0 (0 disables it), got -1"),
    ({"min_tokens": -1}, "min_tokens must be >= 0, got -1"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens=4, got 5"),
    ({"stop": ("",)}, "stop strings must be non-empty, got ('',)"),
    ({"stop_token_ids": (-2,)}, "stop_token_ids must be >= 0, got (-2,)"),
]


@pytest.fixture(scope="module")
def engine(loaded: LoadedFn) -> LLMEngine:
    return LLMEngine(loaded("tiny-llama"), EngineConfig(max_model_len=64))


@pytest.mark.parametrize(("fields", "message"), BAD_PARAMS)
def test_bad_sampling_params(engine: LLMEngine, fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request("r", [5, 6], SamplingParams(**fields))  # type: ignore[arg-type]
    assert not engine.has_unfinished()


def test_bad_prompts_and_requests(engine: LLMEngine) -> None:
    ok = SamplingParams()
    cases = [
        (
            lambda: engine.add_request("r", [], ok),
            "prompt_token_ids must not be empty (got 0 tokens)",
        ),
        (
            lambda: engine.add_request("r", [5] * 65, ok),
            "prompt_token_ids has 65 tokens, more than max_model_len=64",
        ),
        (
            lambda: engine.add_request("r", [5, 300], ok),
            "token id 300 is outside the vocabulary [0, 259)",
        ),
        (
            lambda: engine.add_request(
                "r", [5], SamplingParams(max_tokens=2), prior_output_ids=[7, 8]
            ),
            "prior_output_ids has 2 tokens, not fewer than max_tokens=2",
        ),
        (
            lambda: engine.add_request("r", [5], ok, kv_source=TensorKVSource(3, [])),
            "kv_source.num_tokens must be in (0, 1], got 3",
        ),
        (lambda: engine.export_kv("nope"), "request_id 'nope' holds no exported KV"),
        (lambda: engine.release_kv("nope"), "request_id 'nope' holds no exported KV"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    engine.add_request("dup", [5], ok)
    with pytest.raises(ValueError, match=re.escape("request_id 'dup' is already in the engine")):
        engine.add_request("dup", [5], ok)
    engine.abort("dup")
    assert [o.finish_reason for o in engine.step()] == ["abort"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs must be > 0, got 0"),
        ({"block_size": -16}, "block_size must be > 0, got -16"),
        ({"num_blocks": 0}, "num_blocks must be > 0, got 0"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be > 0, got 0"),
        ({"dtype": "int8"}, "dtype must be one of ['bfloat16', 'float16', 'float32'], got 'int8'"),
    ],
)
def test_bad_engine_config(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig(**fields)  # type: ignore[arg-type]


def test_max_model_len_beyond_the_pool(loaded: LoadedFn) -> None:
    message = "max_model_len=100 exceeds the KV pool (4 blocks of 16 tokens)"
    with pytest.raises(ValueError, match=re.escape(message)):
        LLMEngine(loaded("tiny-llama"), EngineConfig(num_blocks=4, max_model_len=100))


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="no-such-model"):
        LLMEngine("no-such-model")
