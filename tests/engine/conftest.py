"""Shared engine-test fixtures: loaded presets (shared by engines) and an HF greedy oracle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from backends.engine.loader import LoadedModel, export_preset, load_model

PRESETS = ("tiny-llama", "tiny-mla")


def make_prompt(seed: int, length: int) -> list[int]:
    """Token ids 3..258 (never BOS/EOS/pad) drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(3, 259, (length,), generator=gen)]


LoadedFn = Callable[[str], LoadedModel]


@pytest.fixture(scope="session")
def loaded() -> LoadedFn:
    cache: dict[str, LoadedModel] = {}

    def get(name: str) -> LoadedModel:
        if name not in cache:
            cache[name] = load_model(name)
        return cache[name]

    return get


HFGreedy = Callable[[str, list[int], int], tuple[list[int], torch.Tensor]]


@pytest.fixture(scope="session")
def hf_greedy(tmp_path_factory: pytest.TempPathFactory) -> HFGreedy:
    """(preset, prompt, max_new_tokens) -> (HF greedy tokens, log_softmax of HF raw logits)."""
    transformers = pytest.importorskip("transformers")
    models: dict[str, Any] = {}
    results: dict[tuple[str, tuple[int, ...], int], tuple[list[int], torch.Tensor]] = {}

    def run(name: str, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        if name not in models:
            directory: Path = export_preset(name, tmp_path_factory.mktemp(name))
            models[name] = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
        key = (name, tuple(prompt), max_new_tokens)
        if key not in results:
            with torch.no_grad():
                out = models[name].generate(
                    torch.tensor([prompt]),
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                    pad_token_id=0,
                )
            tokens = out.sequences[0, len(prompt) :].tolist()
            logprobs = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)
            results[key] = (tokens, logprobs)
        return results[key]

    return run
