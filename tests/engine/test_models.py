"""Model logits through the paged path equal HF transformers' on the same (exported) weights.

Tolerance: fp32, atol 1e-4 on logits of standard deviation ~1 (observed ~1e-5).
"""

from __future__ import annotations

import pytest
import torch
from test_models_harness import PagedHarness

from backends.engine.loader import LoadedModel, export_preset, load_model

transformers = pytest.importorskip("transformers")
ATOL = 1e-4


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-mla"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[str, LoadedModel, torch.nn.Module]:
    name = request.param
    directory = export_preset(name, tmp_path_factory.mktemp(name))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    return name, load_model(name), hf


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def prompt(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (length,), generator=gen).tolist()


@pytest.mark.parametrize("block_size", [16, 64])
def test_chunked_prefill_then_decode_matches_hf(pair: tuple[str, LoadedModel, torch.nn.Module],
                                                block_size: int) -> None:
    _, ours, hf = pair
    seq_a, seq_b = prompt(1, 75), prompt(2, 46)
    ref_a, ref_b = hf_logits(hf, seq_a), hf_logits(hf, seq_b)
    harness = PagedHarness(ours.model, block_size)
    # Two sequences in one mixed step, then the rest of A's prompt joined by B's next token.
    first = harness.step([(0, seq_a[:37]), (1, seq_b[:40])])
    second = harness.step([(0, seq_a[37:70]), (1, seq_b[40:41])])
    torch.testing.assert_close(first[:37], ref_a[:37], atol=ATOL, rtol=0)
    torch.testing.assert_close(first[37:], ref_b[:40], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[:33], ref_a[37:70], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[33:], ref_b[40:41], atol=ATOL, rtol=0)
    for k in range(5):  # decode-only steps over the cache, batch of two
        out = harness.step([(0, [seq_a[70 + k]]), (1, [seq_b[41 + k]])], decode_only=True)
        torch.testing.assert_close(out[0], ref_a[70 + k], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[1], ref_b[41 + k], atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [16, 64])
def test_decode_only_equals_per_sequence_path(pair: tuple[str, LoadedModel, torch.nn.Module],
                                              block_size: int) -> None:
    _, ours, _ = pair
    lens = [5, 17, 64, 90]
    prompts = [prompt(10 + i, n) for i, n in enumerate(lens)]
    results = []
    for decode_only in (True, False):
        harness = PagedHarness(ours.model, block_size)
        harness.step([(i, p[:-1]) for i, p in enumerate(prompts)])
        results.append(harness.step([(i, p[-1:]) for i, p in enumerate(prompts)], decode_only))
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=0)


def test_greedy_matches_hf_generate(pair: tuple[str, LoadedModel, torch.nn.Module]) -> None:
    _, ours, hf = pair
    ids = ours.tokenizer.encode("The paged cache crosses a block boundary here.")
    harness = PagedHarness(ours.model, 16)
    logits = harness.step([(0, ids)])
    generated = [int(logits[-1].argmax())]
    for _ in range(11):
        generated.append(int(harness.step([(0, generated[-1:])], decode_only=True)[0].argmax()))
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert generated == out[0, len(ids):].tolist()
    assert len(set(generated)) > 1


def test_equal_length_fresh_prompts_batched_match_hf(
        pair: tuple[str, LoadedModel, torch.nn.Module]) -> None:
    """Equal-length prompts without cached prefix take the one-SDPA batched prefill path."""
    _, ours, hf = pair
    prompts = [prompt(30 + i, 20) for i in range(3)]
    harness = PagedHarness(ours.model, 16)
    logits = harness.step([(i, p) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[20 * i:20 * (i + 1)], hf_logits(hf, p), atol=ATOL, rtol=0)
    nxt = harness.step([(i, [7]) for i in range(3)], decode_only=True)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(nxt[i], hf_logits(hf, [*p, 7])[-1], atol=ATOL, rtol=0)
