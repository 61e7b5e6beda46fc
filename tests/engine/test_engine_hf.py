"""Greedy tokens equal HF transformers generate on the same weights (export_preset).

Logprob tolerance: fp32, atol 1e-4 on the chosen tokens' log-probabilities (observed ~1e-6).
HF runs unbatched; the engine batches, chunks its prefill and (in one test) preempts.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PRESETS, HFGreedy, LoadedFn, make_prompt

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)
LENGTHS = {"tiny-llama": (5, 16, 17, 40), "tiny-mla": (5, 63, 65, 130)}  # around block edges


def check_against_hf(
    name: str,
    prompts: list[list[int]],
    outputs: dict[int, tuple[list[int], list[float]]],
    hf_greedy: HFGreedy,
) -> None:
    for i, prompt in enumerate(prompts):
        ref_tokens, ref_logprobs = hf_greedy(name, prompt, GREEDY.max_tokens)
        tokens, logprobs = outputs[i]
        assert tokens == ref_tokens, f"prompt {i} (len {len(prompt)})"
        chosen = ref_logprobs.gather(1, torch.tensor(ref_tokens)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(logprobs), chosen, atol=1e-4, rtol=0)


def run_staggered(
    engine: LLMEngine, prompts: list[list[int]], arrivals: list[int]
) -> dict[int, tuple[list[int], list[float]]]:
    """Add prompt i at step arrivals[i]; collect tokens and logprobs per prompt."""
    got: dict[int, tuple[list[int], list[float]]] = {i: ([], []) for i in range(len(prompts))}
    step = 0
    done = 0
    while done < len(prompts):
        for i, at in enumerate(arrivals):
            if at == step:
                engine.add_request(str(i), prompts[i], GREEDY)
        for out in engine.step():
            got[int(out.request_id)][0].extend(out.new_token_ids)
            got[int(out.request_id)][1].extend(out.new_logprobs)
            done += out.finished
        step += 1
    engine.block_manager.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    return got


@pytest.mark.parametrize("name", PRESETS)
def test_batched_mixed_lengths_joining_late(
    name: str, loaded: LoadedFn, hf_greedy: HFGreedy
) -> None:
    prompts = [make_prompt(i, n) for i, n in enumerate(LENGTHS[name])]
    engine = LLMEngine(loaded(name), EngineConfig(max_num_batched_tokens=48))
    got = run_staggered(engine, prompts, arrivals=[0, 0, 3, 7])
    check_against_hf(name, prompts, got, hf_greedy)


@pytest.mark.parametrize("name", PRESETS)
def test_after_preemption(name: str, loaded: LoadedFn, hf_greedy: HFGreedy) -> None:
    prompts = [make_prompt(i, n) for i, n in enumerate(LENGTHS[name])]
    block_size = 16 if name == "tiny-llama" else 64
    longest = max(LENGTHS[name]) + GREEDY.max_tokens
    num_blocks = (
        -(-longest // block_size) + 2
    )  # room for the longest plus a little: forces preemption
    engine = LLMEngine(loaded(name), EngineConfig(num_blocks=num_blocks, max_num_batched_tokens=64))
    got = run_staggered(engine, prompts, arrivals=[0, 0, 0, 0])
    assert engine.scheduler.num_preemptions > 0
    check_against_hf(name, prompts, got, hf_greedy)
