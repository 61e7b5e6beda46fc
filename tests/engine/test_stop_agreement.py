"""The engine's stop decision and the orchestrator's text cut agree (one detokenizer, seeded alike).

A sentencepiece-style tokenizer (the `tokenizers` Metaspace decoder, as Llama / Mistral decode)
marks a word boundary on the following token: decoded alone, the first output word loses its
space ("w5"), decoded after the prompt it keeps it (" w5"). The engine used to decode output
without context, the orchestrator with the prompt's tail, so a stop string starting with that
space ended the orchestrator's text while the worker's engine generated on. Both now use
TextStream seeded with the prompt. (SmolLM2's byte-level BPE decodes a token the same with or
without context unless the prompt ends mid-character, so it cannot show this.)
"""

from __future__ import annotations

import dataclasses

import pytest
from conftest import LoadedFn, make_prompt
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.loader import LoadedModel
from backends.engine.outputs import RequestOutput
from backends.engine.sampling_params import SamplingParams
from backends.engine.text_stream import TextStream
from backends.engine.tokenizer import Tokenizer


def sentencepiece_like(vocab_size: int) -> Tokenizer:
    """Model token i is the word "w<i>" with sentencepiece's boundary mark: "▁w<i>" (EOS and
    UNK lie outside the model's vocabulary; the requests ignore EOS)."""
    vocab = {**{f"▁w{i}": i for i in range(vocab_size)}, "</s>": vocab_size,
             "<unk>": vocab_size + 1}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return Tokenizer(backend, bos_token=None, eos_token="</s>")


def run_one(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    engine.add_request("r", prompt, params)
    outs: list[RequestOutput] = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


@pytest.mark.parametrize(("async_output", "detokenize"), [(False, True), (True, True), (True, False)])
def test_engine_stops_where_the_orchestrator_cuts(loaded: LoadedFn, async_output: bool,
                                                  detokenize: bool) -> None:
    tiny = loaded("tiny-llama")
    tok = sentencepiece_like(tiny.config.vocab_size)
    model = LoadedModel(tiny.model, tok, tiny.config)
    prompt = make_prompt(11, 10)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    config = EngineConfig(async_output=async_output, detokenize=detokenize)
    free = [t for o in run_one(LLMEngine(model, config), prompt, greedy) for t in o.new_token_ids]
    assert len(free) == 8
    stop = f" w{free[0]}"  # the first output word, with the space the prompt gives it

    # The old engine-side decoder (no context) never sees the stop string in these 8 tokens;
    # the orchestrator's (the prompt as context) sees it at once.
    no_context = TextStream(tok, (stop,))
    assert [no_context.feed([t]).stopped for t in free] == [False] * 8
    no_context.finish()
    assert no_context.text == " ".join(f"w{t}" for t in free)
    orchestrator = TextStream(tok, (stop,), prompt)
    assert orchestrator.feed(free[:1]).stopped and orchestrator.text == ""

    outs = run_one(LLMEngine(model, config), prompt, dataclasses.replace(greedy, stop=(stop,)))
    assert [o.new_token_ids for o in outs] == [(free[0],)]
    assert (outs[-1].finished, outs[-1].finish_reason, outs[-1].text) == (True, "stop", "")


def test_a_stop_string_later_in_the_text_cuts_both_at_the_same_character(
        loaded: LoadedFn) -> None:
    tiny = loaded("tiny-llama")
    tok = sentencepiece_like(tiny.config.vocab_size)
    model = LoadedModel(tiny.model, tok, tiny.config)
    prompt = make_prompt(12, 10)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    free = [t for o in run_one(LLMEngine(model), prompt, greedy) for t in o.new_token_ids]
    k = next(i for i in range(2, 8)
             if not any(f"w{t}".startswith(f"w{free[i]}") for t in free[:i]))
    stop = f" w{free[k]}"
    outs = run_one(LLMEngine(model), prompt, dataclasses.replace(greedy, stop=(stop,)))
    ids = [t for o in outs for t in o.new_token_ids]
    assert ids == free[: k + 1]
    orchestrator = TextStream(tok, (stop,), prompt)
    deltas = [orchestrator.feed([t]) for t in ids]
    assert [d.stopped for d in deltas] == [False] * k + [True]
    expected = "".join(f" w{t}" for t in free[:k])
    assert outs[-1].text == orchestrator.text == expected
    assert outs[-1].finish_reason == "stop"
