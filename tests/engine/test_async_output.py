"""async_output: a step's text is produced during the next step; streams stay the same.

With async_output each request's outputs arrive one `step` call later, but per request the
sequence of outputs (token ids, text, finish reason, counts) equals the synchronous engine's,
requests with stop strings are never deferred, an abort's final output comes after the
request's earlier outputs, and a finished prefill-only request's KV can be exported.
"""

from __future__ import annotations

import dataclasses

import pytest
from conftest import LoadedFn, make_prompt

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.outputs import RequestOutput
from backends.engine.sampling_params import SamplingParams


def run(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]],
        abort_at: dict[str, int]) -> tuple[dict[str, list[RequestOutput]], int]:
    """Add every request, step to the end (aborting `rid` after that many step calls: the
    same tokens exist then, whether or not their outputs were emitted yet); outputs per
    request and the number of step calls."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    got: dict[str, list[RequestOutput]] = {rid: [] for rid, _, _ in requests}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].append(out)
        steps += 1
        for rid, at in abort_at.items():
            if steps == at:
                engine.abort(rid)
    return got, steps


def test_streams_equal_the_synchronous_engine(loaded: LoadedFn) -> None:
    greedy = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=True)
    requests = [
        ("plain", make_prompt(1, 9), greedy),
        ("stop", make_prompt(2, 12), dataclasses.replace(greedy, stop=("e", "a"))),
        ("short", make_prompt(3, 5), dataclasses.replace(greedy, max_tokens=3)),
        ("sampled", make_prompt(4, 20), SamplingParams(max_tokens=10, temperature=0.8, seed=5)),
        ("aborted", make_prompt(5, 7), greedy),
    ]
    results = {}
    steps = {}
    for flag in (False, True):
        engine = LLMEngine(loaded("tiny-llama"), EngineConfig(async_output=flag))
        assert engine.async_output is flag
        results[flag], steps[flag] = run(engine, requests, {"aborted": 4})
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    sync, deferred = results[False], results[True]
    assert sync == deferred
    assert sync["aborted"][-1].finish_reason == "abort" and len(sync["aborted"]) == 5
    assert len(sync["plain"]) == 14 and sync["plain"][-1].text
    assert steps[True] == steps[False] + 1  # the last outputs need one more call


def test_outputs_arrive_one_step_later(loaded: LoadedFn) -> None:
    engine = LLMEngine(loaded("tiny-llama"), EngineConfig(async_output=True))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request("a", make_prompt(6, 8), params)
    engine.add_request("s", make_prompt(7, 8), dataclasses.replace(params, stop=("zz",)))
    first = engine.step()
    assert [o.request_id for o in first] == ["s"]  # stop strings: never deferred
    second = engine.step()
    assert [o.request_id for o in second] == ["a", "s"]  # a's first token, then s's second
    assert second[0].num_output_tokens == 1 and second[1].num_output_tokens == 2


def test_prefill_only_export_after_deferred_finish(loaded: LoadedFn) -> None:
    engine = LLMEngine(loaded("tiny-llama"), EngineConfig(async_output=True))
    engine.add_request("p", make_prompt(8, 40), SamplingParams(max_tokens=4, temperature=0.0),
                       prefill_only=True)
    assert engine.step() == []
    (out,) = engine.step()
    assert out.finished and out.num_output_tokens == 1
    export = engine.export_kv("p")
    assert export.num_tokens == 40
    engine.release_kv("p")
    assert not engine.has_unfinished()


@pytest.mark.parametrize(("device", "flag", "expected"), [
    ("cpu", None, False), ("cuda", None, True), ("cuda:1", None, True), ("cuda", False, False),
    ("cpu", True, True)])
def test_default_follows_the_device(device: str, flag: bool | None, expected: bool) -> None:
    assert EngineConfig(device=device, async_output=flag).async_output_on() is expected


@pytest.mark.parametrize("async_output", [False, True])
def test_without_detokenize_outputs_are_the_same_ids_and_no_text(loaded: LoadedFn, async_output: bool) -> None:
    """detokenize=False (a worker's engine: the orchestrator makes the text): the same token
    ids, ends and counts as with text, every text empty; stop strings still end requests."""
    greedy = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    plain, _ = run(LLMEngine(loaded("tiny-llama"), EngineConfig()), [("p", make_prompt(2, 12), greedy)], {})
    text = "".join(o.text for o in plain["p"])
    assert len(text) > 6
    requests = [("plain", make_prompt(1, 9), greedy),
                ("stop", make_prompt(2, 12), dataclasses.replace(greedy, stop=(text[4:6],)))]
    runs = {}
    for flag in (True, False):
        engine = LLMEngine(loaded("tiny-llama"), EngineConfig(async_output=async_output, detokenize=flag))
        runs[flag], _ = run(engine, requests, {})
    with_text, ids_only = runs[True], runs[False]
    assert {rid: [dataclasses.replace(o, text="") for o in outs] for rid, outs in with_text.items()} == ids_only
    assert all(o.text == "" for outs in ids_only.values() for o in outs)
    assert ids_only["stop"][-1].finish_reason == "stop" and len(ids_only["stop"]) < 14
