"""Sampling: seeded reproducibility independent of the batch, top-k/top-p, min_tokens, stops."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import LoadedFn, make_prompt

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampler import Sampler, SampleRow
from backends.engine.sampling_params import SamplingParams

SEEDED = SamplingParams(
    max_tokens=12, temperature=1.0, top_k=50, top_p=0.95, seed=1234, ignore_eos=True
)


def run(
    engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams, int]]
) -> dict[str, list[int]]:
    """requests: id -> (prompt, params, arrival step)."""
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    step = 0
    while step <= max(a for _, _, a in requests.values()) or engine.has_unfinished():
        for rid, (prompt, params, at) in requests.items():
            if at == step:
                engine.add_request(rid, prompt, params)
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    return tokens


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mla"])
def test_seeded_sampling_is_independent_of_the_batch(name: str, loaded: LoadedFn) -> None:
    prompt = make_prompt(1, 20)
    alone = run(LLMEngine(loaded(name)), {"a": (prompt, SEEDED, 0)})["a"]
    others = {
        f"o{i}": (make_prompt(10 + i, 5 + 9 * i), SamplingParams(max_tokens=9, ignore_eos=True), i)
        for i in range(4)
    }
    crowded = run(
        LLMEngine(loaded(name), EngineConfig(max_num_batched_tokens=24, seed=99)),
        {**others, "a": (prompt, SEEDED, 2)},
    )
    assert crowded["a"] == alone
    again = run(LLMEngine(loaded(name)), {"a": (prompt, SEEDED, 0)})["a"]
    assert again == alone
    other_seed = run(
        LLMEngine(loaded(name)),
        {"a": (prompt, dataclasses.replace(SEEDED, seed=4321), 0)},
    )["a"]
    assert other_seed != alone


def test_top_k_1_equals_greedy(loaded: LoadedFn) -> None:
    engine = LLMEngine(loaded("tiny-llama"))
    prompts = [make_prompt(3, 9), make_prompt(4, 30)]
    greedy = engine.generate(
        prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    )
    top1 = engine.generate(
        prompts, SamplingParams(max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True)
    )
    assert [r.output_token_ids for r in top1] == [r.output_token_ids for r in greedy]


def draws(logits: list[float], params: SamplingParams, n: int) -> set[int]:
    sampler = Sampler(eos_token_ids=(2,))
    rows = [SampleRow(dataclasses.replace(params, seed=s), 0) for s in range(n)]
    out = sampler.sample(torch.tensor([logits] * n), rows)
    return set(out.token_ids)


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist()
    assert draws(logits, SamplingParams(), 300) == {0, 1, 2, 3}
    assert draws(logits, SamplingParams(top_k=2), 300) == {0, 1}
    assert draws(logits, SamplingParams(top_p=0.7), 300) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert draws(logits, SamplingParams(top_p=0.5), 300) == {0}
    assert draws(logits, SamplingParams(top_k=3, top_p=0.99), 300) == {0, 1, 2}


def test_min_tokens_masks_eos_and_stop_ids_then_releases_them() -> None:
    sampler = Sampler(eos_token_ids=(2,))
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]] * 4)
    greedy = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    rows = [
        SampleRow(greedy, 0),
        SampleRow(greedy, 1),
        SampleRow(greedy, 2),
        SampleRow(SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True), 0),
    ]
    assert sampler.sample(logits, rows).token_ids == [4, 4, 2, 2]


def test_logprobs_are_of_the_raw_distribution() -> None:
    sampler = Sampler(eos_token_ids=(2,))
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    params = SamplingParams(temperature=0.5, top_k=1, logprobs=True)
    out = sampler.sample(logits.clone(), [SampleRow(params, 0)])
    assert out.token_ids == [2]
    assert out.logprobs == pytest.approx([torch.log_softmax(logits, -1)[0, 2].item()], abs=1e-6)


def test_stop_token_id_ends_the_request(loaded: LoadedFn) -> None:
    engine = LLMEngine(loaded("tiny-llama"))
    prompt = make_prompt(7, 12)
    base = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    full = engine.generate([prompt], base)[0].output_token_ids
    index = next(i for i, t in enumerate(full) if full.index(t) == i and i >= 3)
    stopped = engine.generate([prompt], dataclasses.replace(base, stop_token_ids=(full[index],)))[0]
    assert stopped.output_token_ids == full[: index + 1]
    assert stopped.finish_reason == "stop"


def test_stop_strings_cut_exactly(loaded: LoadedFn) -> None:
    engine = LLMEngine(loaded("tiny-llama"))
    tok = engine.tokenizer
    prompt = tok.encode("The quick brown fox")
    base = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    full = engine.generate([prompt], base)[0]
    # U+FFFDs the text ends with (an incomplete or invalid character when max_tokens cut it) are
    # dropped since the engine makes text with the orchestrator's detokenizer (as vLLM does);
    # this output ends with two of them.
    assert full.text == tok.decode(list(full.output_token_ids)).rstrip("\ufffd")
    text = full.text
    k = next(
        i
        for i in range(4, len(text) - 2)
        if text.find(text[i : i + 2]) == i and "\ufffd" not in text[i : i + 2]
    )
    stop = text[k : k + 2]
    params = dataclasses.replace(base, stop=("never-there", stop))
    engine.add_request("s", prompt, params)
    streamed: list[str] = []
    ids: list[int] = []
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            streamed.append(out.text)
            ids += out.new_token_ids
            final = out
    assert final is not None and final.finish_reason == "stop"
    assert final.text == text[:k]
    num_ids = next(
        n
        for n in range(1, len(full.output_token_ids) + 1)
        if stop in tok.decode(list(full.output_token_ids[:n]))
    )
    assert tuple(ids) == full.output_token_ids[:num_ids]
    assert all(
        b.startswith(a) for a, b in zip(streamed, streamed[1:], strict=False)
    )  # text never retracts
