"""Parsing public requests: llm (vllm_backend tensors) and ensemble (tensorrtllm_backend tensors)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from backends.serving.requests import (
    GenerateRequest,
    Limits,
    parse_ensemble,
    parse_llm,
    with_bad_words_ids,
)
from backends.serving.worker_io import WorkerJob, job_parameters, job_tensors, parse_job

LIMITS = Limits(max_tokens=100, default_max_tokens=16)


def s(text: str | bytes) -> np.ndarray:
    return np.array([text.encode() if isinstance(text, str) else text], dtype=np.object_)


def sp(**params: object) -> np.ndarray:
    return s(json.dumps(params))


def b(value: bool) -> np.ndarray:
    return np.array([value], dtype=np.bool_)


def llm(**inputs: np.ndarray) -> GenerateRequest:
    return parse_llm({"text_input": s("hi"), **inputs}, LIMITS)


def test_llm_full_request() -> None:
    req = parse_llm({"text_input": s("héllo"), "stream": b(True), "return_finish_reason": b(True),
                     "return_num_input_tokens": b(True), "return_num_output_tokens": b(False),
                     "sampling_parameters": sp(max_tokens=7, temperature=0, top_k=-1, top_p=0.5,
                                               seed=3, stop=["x", "yz"], stop_token_ids=[2],
                                               min_tokens=1, ignore_eos=True, n=1)}, LIMITS)
    assert req == GenerateRequest(
        api="llm", prompt="héllo", stream=True, exclude_input_in_output=True,
        params=SamplingParams(max_tokens=7, temperature=0.0, top_k=0, top_p=0.5, min_tokens=1, seed=3,
                              stop_token_ids=(2,), stop=("x", "yz"), ignore_eos=True),
        return_finish_reason=True, return_num_input_tokens=True)


def test_llm_defaults_include_the_prompt_unless_streaming() -> None:
    assert llm() == GenerateRequest("llm", "hi", SamplingParams(max_tokens=16), False, False)
    assert llm(sampling_parameters=s("  ")).params == SamplingParams(max_tokens=16)
    assert llm(stream=b(True)).exclude_input_in_output is True
    assert llm(exclude_input_in_output=b(True)).exclude_input_in_output is True
    assert llm(sampling_parameters=sp(stop="end")).params.stop == ("end",)


@pytest.mark.parametrize(("inputs", "message"), [
    ({"text_input": None}, "text_input: required input is missing"),
    ({"text_input": s("")}, "text_input: prompt is empty"),
    ({"text_input": np.array([], dtype=np.object_)}, "text_input: tensor is empty"),
    ({"text_input": s(b"\xff")}, "text_input: not valid UTF-8 (invalid start byte)"),
    ({"text_input": np.array([5])}, "text_input: expected a string, got int64"),
    ({"sampling_parameters": s("{x")},
     "sampling_parameters: not valid JSON (Expecting property name enclosed in double quotes at 1)"),
    ({"sampling_parameters": s("[1]")}, "sampling_parameters: expected a JSON object, got list"),
    ({"sampling_parameters": sp(bogus=1)}, "sampling_parameters.bogus: unknown key"),
    ({"sampling_parameters": sp(n=2)}, "sampling_parameters.n: only 1 is supported, got 2"),
    ({"sampling_parameters": sp(length_penalty=0.5)},
     "sampling_parameters.length_penalty: only 1.0 is supported, got 0.5"),
    ({"sampling_parameters": sp(presence_penalty=2.5)},
     "sampling_parameters.presence_penalty must be in [-2, 2], got 2.5"),
    ({"sampling_parameters": sp(frequency_penalty="x")},
     "sampling_parameters.frequency_penalty: expected a number, got 'x'"),
    ({"sampling_parameters": sp(repetition_penalty=0)},
     "sampling_parameters.repetition_penalty must be > 0 (1.0 disables it), got 0.0"),
    ({"sampling_parameters": sp(min_p=1.5)}, "sampling_parameters.min_p must be in [0, 1], got 1.5"),
    ({"sampling_parameters": sp(bad_words=["a", 3])},
     "sampling_parameters.bad_words: expected non-empty strings, got ['a', 3]"),
    ({"sampling_parameters": sp(max_tokens=0)}, "sampling_parameters.max_tokens must be > 0, got 0"),
    ({"sampling_parameters": sp(max_tokens=-3)}, "sampling_parameters.max_tokens must be > 0, got -3"),
    ({"sampling_parameters": sp(max_tokens=101)}, "sampling_parameters.max_tokens must be <= 100, got 101"),
    ({"sampling_parameters": sp(max_tokens=4.5)}, "sampling_parameters.max_tokens: expected an integer, got 4.5"),
    ({"sampling_parameters": sp(max_tokens="x")}, "sampling_parameters.max_tokens: expected an integer, got 'x'"),
    ({"sampling_parameters": sp(max_tokens=True)}, "sampling_parameters.max_tokens: expected an integer, got True"),
    ({"sampling_parameters": sp(temperature="hot")}, "sampling_parameters.temperature: expected a number, got 'hot'"),
    ({"sampling_parameters": sp(temperature=True)}, "sampling_parameters.temperature: expected a number, got True"),
    ({"sampling_parameters": s('{"top_p": NaN}')}, "sampling_parameters.top_p: expected a finite number, got nan"),
    ({"sampling_parameters": sp(temperature=-1)}, "sampling_parameters.temperature must be >= 0, got -1.0"),
    ({"sampling_parameters": sp(top_p=0)}, "sampling_parameters.top_p must be in (0, 1], got 0.0"),
    ({"sampling_parameters": sp(top_k=-2)}, "sampling_parameters.top_k must be >= 0 (0 disables it), got -2"),
    ({"sampling_parameters": sp(stop=[""])}, "sampling_parameters.stop: expected non-empty strings, got ['']"),
    ({"sampling_parameters": sp(stop=5)}, "sampling_parameters.stop: expected non-empty strings, got 5"),
    ({"sampling_parameters": sp(stop_token_ids=[-1])},
     "sampling_parameters.stop_token_ids: expected token ids, got [-1]"),
    ({"sampling_parameters": sp(max_tokens=2, min_tokens=3)},
     "sampling_parameters.min_tokens must be <= max_tokens=2, got 3"),
    ({"sampling_parameters": sp(seed="abc")}, "sampling_parameters.seed: expected an integer, got 'abc'"),
    ({"sampling_parameters": sp(ignore_eos="yes")},
     "sampling_parameters.ignore_eos: expected true or false, got 'yes'"),
    ({"stream": b(True), "exclude_input_in_output": b(False)},  # vllm_backend's exact text
     "Error generating stream: When streaming, `exclude_input_in_output` = False is not allowed."),
])
def test_llm_bad_input_names_the_field(inputs: dict[str, np.ndarray | None], message: str) -> None:
    tensors = {k: v for k, v in {"text_input": s("hi"), **inputs}.items() if v is not None}
    with pytest.raises(ValueError) as info:
        parse_llm(tensors, LIMITS)
    assert str(info.value) == message


def one(value: object, dtype: type) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def ens(**inputs: np.ndarray) -> GenerateRequest:
    return parse_ensemble({"text_input": one(b"hi", np.object_), **inputs}, LIMITS)


def test_ensemble_full_request() -> None:
    req = ens(max_tokens=one(5, np.int32), temperature=one(0.0, np.float32), top_k=one(1, np.int32),
              top_p=one(0.5, np.float32), min_length=one(2, np.int32), random_seed=one(7, np.uint64),
              end_id=one(2, np.int32), pad_id=one(2, np.int32), beam_width=one(1, np.int32),
              stop_words=np.array([[b"a,b", b"c"]], dtype=np.object_), stream=one(True, np.bool_),
              return_log_probs=one(True, np.bool_))
    assert req == GenerateRequest(
        api="ensemble", prompt="hi", stream=True, exclude_input_in_output=True,
        params=SamplingParams(max_tokens=5, temperature=0.0, top_k=1, top_p=0.5, min_tokens=2, seed=7,
                              stop_token_ids=(2,), stop=("a", "b", "c"), logprobs=True),
        return_finish_reason=True, return_num_input_tokens=True, return_num_output_tokens=True,
        return_logprobs=True)


def test_ensemble_defaults_and_precedence() -> None:
    assert ens() == GenerateRequest("ensemble", "hi", SamplingParams(max_tokens=16), False, False,
                                    True, True, True, False)
    both = ens(seed=one(3, np.uint64), random_seed=one(7, np.uint64), min_tokens=one(2, np.int32),
               min_length=one(1, np.int32))
    assert (both.params.seed, both.params.min_tokens) == (3, 2)
    assert parse_ensemble({"text_input": np.array([b"hi"], dtype=np.object_)}, LIMITS).prompt == "hi"


@pytest.mark.parametrize(("inputs", "message"), [
    ({"text_input": None}, "text_input: required input is missing"),
    ({"text_input": np.array([[b"a"], [b"b"]], dtype=np.object_)}, "text_input: batch size 2 > 1 is not supported"),
    ({"max_tokens": one(0, np.int32)}, "max_tokens must be > 0, got 0"),
    ({"max_tokens": one(-2, np.int32)}, "max_tokens must be > 0, got -2"),
    ({"max_tokens": one(101, np.int32)}, "max_tokens must be <= 100, got 101"),
    ({"max_tokens": one(2.0, np.float32)}, "max_tokens: expected an integer, got 2.0"),
    ({"beam_width": one(2, np.int32)}, "beam_width: only 1 is supported, got 2"),
    ({"num_return_sequences": one(3, np.int32)}, "num_return_sequences: only 1 is supported, got 3"),
    ({"frequency_penalty": one(3.0, np.float32)}, "frequency_penalty must be in [-2, 2], got 3.0"),
    ({"presence_penalty": one(-2.5, np.float32)}, "presence_penalty must be in [-2, 2], got -2.5"),
    ({"repetition_penalty": one(-1.0, np.float32)},
     "repetition_penalty must be > 0 (1.0 disables it), got -1.0"),
    ({"return_generation_logits": one(True, np.bool_)}, "return_generation_logits: only False is supported, got True"),
    ({"temperature": one(-1.0, np.float32)}, "temperature must be >= 0, got -1.0"),
    ({"temperature": one(np.inf, np.float32)}, "temperature: expected a finite number, got inf"),
    ({"temperature": one(b"hot", np.object_)}, "temperature: expected a number, got b'hot'"),
    ({"top_p": one(1.5, np.float32)}, "top_p must be in (0, 1], got 1.5"),
    ({"top_k": one(-1, np.int32)}, "top_k must be >= 0 (0 disables it), got -1"),
    ({"max_tokens": one(2, np.int32), "min_length": one(3, np.int32)},
     "min_length must be in [0, max_tokens=2], got 3"),
    ({"min_tokens": one(-1, np.int32)}, "min_tokens must be in [0, max_tokens=16], got -1"),
    ({"end_id": one(-1, np.int32)}, "end_id must be a token id >= 0, got -1"),
    ({"stream": one(True, np.bool_), "exclude_input_in_output": one(False, np.bool_)},
     "exclude_input_in_output: false is not supported when streaming (stream=true); "
     "send exclude_input_in_output=true or omit it"),
])
def test_ensemble_bad_input_names_the_field(inputs: dict[str, np.ndarray | None], message: str) -> None:
    tensors = {k: v for k, v in {"text_input": one(b"hi", np.object_), **inputs}.items() if v is not None}
    with pytest.raises(ValueError) as info:
        parse_ensemble(tensors, LIMITS)
    assert str(info.value) == message


def test_llm_penalties_min_p_and_bad_words() -> None:
    req = llm(sampling_parameters=sp(repetition_penalty=1.5, presence_penalty=-0.5,
                                     frequency_penalty=0.25, min_p=0.1, bad_words=["ab", "c"]))
    assert req.params == SamplingParams(max_tokens=16, repetition_penalty=1.5, presence_penalty=-0.5,
                                        frequency_penalty=0.25, min_p=0.1)
    assert req.bad_words == ("ab", "c")
    assert llm(sampling_parameters=sp(bad_words="x")).bad_words == ("x",)
    tokenized = with_bad_words_ids(req, byte_level_tokenizer())
    assert tokenized.params.bad_words_ids == ((100, 101), (102,))  # byte b -> id 3 + b
    assert tokenized.bad_words == ("ab", "c")


def test_ensemble_penalties_and_bad_words() -> None:
    req = ens(repetition_penalty=one(1.5, np.float32), presence_penalty=one(0.5, np.float32),
              frequency_penalty=one(-1.0, np.float32),
              bad_words=np.array([[b"x,yz", b"w"]], dtype=np.object_))
    assert req.params == SamplingParams(max_tokens=16, repetition_penalty=1.5, presence_penalty=0.5,
                                        frequency_penalty=-1.0)
    assert req.bad_words == ("x", "yz", "w")
    assert with_bad_words_ids(req, byte_level_tokenizer()).params.bad_words_ids == (
        (123,), (124, 125), (122,))
    assert with_bad_words_ids(ens(), byte_level_tokenizer()) == ens()


def test_worker_wire_carries_penalties_and_bad_words() -> None:
    params = SamplingParams(max_tokens=9, repetition_penalty=1.5, presence_penalty=-0.5,
                            frequency_penalty=0.25, min_p=0.125, bad_words_ids=((7, 8), (9,), (1, 2, 3)))
    job = WorkerJob("r1", "context_and_generation", (5, 6), params)
    tensors = job_tensors(job)
    assert tensors["bad_words_list"].tolist() == [[7, 8, 9, 1, 2, 3], [2, 3, 6, -1, -1, -1]]
    assert parse_job(tensors, job_parameters(job), "x") == job
    plain = WorkerJob("r2", "context_and_generation", (5,), SamplingParams())
    assert parse_job(job_tensors(plain), job_parameters(plain), "x") == plain
    bad = {**tensors, "bad_words_list": np.array([[7, 8], [3, -1]], dtype=np.int32)}
    with pytest.raises(ValueError) as info:
        parse_job(bad, job_parameters(job), "x")
    assert str(info.value) == "bad_words_list: bad end offsets [3, -1] for 2 ids"
