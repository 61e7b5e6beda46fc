"""Repetition / presence / frequency penalties, min-p and bad words (engine + sampler).

Repetition penalty is checked against HF transformers generate on the exported tiny-llama
weights; presence/frequency, min-p and bad words against explicit per-row references.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LoadedFn, make_prompt

from backends.engine.engine import LLMEngine
from backends.engine.loader import export_preset
from backends.engine.sampler import Sampler, SampleRow, token_seed
from backends.engine.sampling_params import SamplingParams

VOCAB = 50
EOS = (2,)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory: pytest.TempPathFactory) -> Any:
    transformers = pytest.importorskip("transformers")
    directory: Path = export_preset("tiny-llama", tmp_path_factory.mktemp("tiny-llama"))
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()


def _engine_tokens(
    engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]
) -> list[list[int]]:
    return [list(r.output_token_ids) for r in engine.generate(prompts, params)]


def test_repetition_penalty_greedy_equals_hf(loaded: LoadedFn, hf_llama: Any) -> None:
    prompts = [make_prompt(i, n) for i, n in enumerate((5, 16, 17))]
    penalties = (1.3, 0.7, 1.0)
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=p)
        for p in penalties
    ]
    got = _engine_tokens(LLMEngine(loaded("tiny-llama")), prompts, params)
    for prompt, penalty, tokens in zip(prompts, penalties, got, strict=True):
        with torch.no_grad():
            out = hf_llama.generate(
                torch.tensor([prompt]),
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
                repetition_penalty=penalty,
                pad_token_id=0,
            )
        assert tokens == out[0, len(prompt) :].tolist(), f"penalty {penalty}"
    plain = _engine_tokens(LLMEngine(loaded("tiny-llama")), prompts[:1], [params[2]])[0]
    assert got[0] != plain  # the penalty changed this output


def _reference_penalties(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    x = logits.clone()
    p = row.params
    for t in set(row.token_ids):
        x[t] = x[t] * p.repetition_penalty if x[t] < 0 else x[t] / p.repetition_penalty
    for t, c in Counter(row.output_ids).items():
        x[t] = x[t] - p.frequency_penalty * c - p.presence_penalty
    return x


def test_presence_frequency_and_repetition_match_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=gen) * 3
    greedy = SamplingParams(temperature=0.0)
    rows = [
        SampleRow(dataclasses.replace(greedy, presence_penalty=1.5), 3, (5, 6, 7, 7, 9), 2),
        SampleRow(dataclasses.replace(greedy, frequency_penalty=-0.5), 4, (1, 8, 8, 8, 3), 1),
        SampleRow(greedy, 2, (4, 4, 4), 1),  # no penalty: untouched
        SampleRow(
            dataclasses.replace(
                greedy, repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=2.0
            ),
            3,
            (10, 11, 12, 11, 11, 40),
            3,
        ),
    ]
    expected = torch.stack([_reference_penalties(logits[i], r) for i, r in enumerate(rows)])
    work = logits.clone()
    out = Sampler(EOS).sample(work, rows)
    torch.testing.assert_close(work, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(work[2], logits[2])
    assert out.token_ids == expected.argmax(dim=-1).tolist()


def _reference_min_p_draw(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    x = logits / params.temperature
    probs = torch.softmax(x, dim=-1)
    keep = [t for t in range(VOCAB) if probs[t] >= params.min_p * probs.max()]
    masked = torch.full_like(x, float("-inf"))
    masked[keep] = x[keep]
    assert params.seed is not None
    noise = torch.empty(VOCAB).exponential_(
        generator=torch.Generator().manual_seed(token_seed(params.seed, index))
    )
    return int((torch.softmax(masked, dim=-1) / noise).argmax())


def test_min_p_matches_reference_and_restricts_support() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(VOCAB, generator=gen) * 2
    probs = torch.softmax(logits / 0.8, dim=-1)
    allowed = set((probs >= 0.2 * probs.max()).nonzero().flatten().tolist())
    assert 1 < len(allowed) < 10
    rows = [SampleRow(SamplingParams(temperature=0.8, min_p=0.2, seed=s), 0) for s in range(64)]
    out = Sampler(EOS).sample(logits.repeat(64, 1), rows)
    assert set(out.token_ids) == allowed
    assert out.token_ids == [_reference_min_p_draw(logits, r.params, 0) for r in rows]


def test_seeded_penalties_are_batch_independent(loaded: LoadedFn) -> None:
    params = SamplingParams(
        max_tokens=10,
        seed=7,
        ignore_eos=True,
        repetition_penalty=1.2,
        presence_penalty=0.4,
        frequency_penalty=0.3,
        min_p=0.05,
    )
    prompt = make_prompt(3, 9)
    alone = _engine_tokens(LLMEngine(loaded("tiny-llama")), [prompt], [params])[0]
    others = [make_prompt(i, 7 + i) for i in range(3)]
    batch = _engine_tokens(
        LLMEngine(loaded("tiny-llama")),
        [*others, prompt],
        [SamplingParams(max_tokens=10, temperature=0.0)] * 3 + [params],
    )
    assert batch[3] == alone


def _reference_bad_words(
    model: Any, prompt: list[int], max_tokens: int, words: tuple[tuple[int, ...], ...]
) -> list[int]:
    """Greedy decoding with the HF model (full forward per token), masking bad words."""
    out: list[int] = []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
        logits[list(EOS)] = float("-inf")
        for word in words:
            if len(word) == 1 or out[len(out) - len(word) + 1 :] == list(word[:-1]):
                logits[word[-1]] = float("-inf")
        out.append(int(logits.argmax()))
    return out


def _contains(tokens: list[int], word: tuple[int, ...]) -> bool:
    n = len(word)
    return any(tuple(tokens[i : i + n]) == word for i in range(len(tokens) - n + 1))


def test_bad_words_are_never_generated(loaded: LoadedFn, hf_llama: Any) -> None:
    prompt = make_prompt(5, 12)
    base = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    free = _engine_tokens(LLMEngine(loaded("tiny-llama")), [prompt], [base])[0]
    assert free == _reference_bad_words(hf_llama, prompt, 16, ())
    single = (free[1],)
    pair = (free[4], free[5])
    for words in ((single,), (pair,), (single, pair)):
        params = dataclasses.replace(base, bad_words_ids=words)
        got = _engine_tokens(LLMEngine(loaded("tiny-llama")), [prompt], [params])[0]
        assert all(not _contains(got, w) for w in words), words
        assert got == _reference_bad_words(hf_llama, prompt, 16, words), words
        assert got != free


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0 (1.0 disables it), got 0.0"),
        (
            {"repetition_penalty": float("nan")},
            "repetition_penalty must be > 0 (1.0 disables it), got nan",
        ),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -2.01}, "frequency_penalty must be in [-2, 2], got -2.01"),
        ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5"),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        (
            {"bad_words_ids": ((3,), ())},
            "bad_words_ids must be non-empty sequences of token ids >= 0, got ((3,), ())",
        ),
        (
            {"bad_words_ids": ((3, -1),)},
            "bad_words_ids must be non-empty sequences of token ids >= 0, got ((3, -1),)",
        ),
    ],
)
def test_validation_messages(change: dict[str, Any], message: str) -> None:
    params = dataclasses.replace(SamplingParams(), **change)
    with pytest.raises(ValueError) as info:
        params.validate(max_model_len=64, prompt_len=4)
    assert str(info.value) == message


def test_bad_word_outside_vocabulary_is_rejected(loaded: LoadedFn) -> None:
    engine = LLMEngine(loaded("tiny-llama"))
    with pytest.raises(ValueError) as info:
        engine.add_request("r", [5, 6], SamplingParams(bad_words_ids=((5, 259),)))
    assert str(info.value) == "bad_words_ids: token id 259 is outside the vocabulary [0, 259)"
