"""KV import through the engine: running sequences keep decoding while another request's KV is
still arriving (its source blocked on a gate the test holds), and every output equals the one
the same request gets computed alone. The first test also runs on CUDA when there is a GPU (the
import worker then writes on its own stream)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import LoadedFn, make_prompt
from kv_import_sources import GatedSource, wait_until

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.loader import LoadedModel, load_model
from backends.engine.outputs import RequestOutput
from backends.engine.sampling_params import SamplingParams
from backends.engine.sequence import SeqStatus

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
NEIGHBOURS = {f"n{i}": make_prompt(30 + i, 9 + 4 * i) for i in range(3)}


@functools.cache
def cuda_model() -> LoadedModel:
    return load_model("tiny-llama", device="cuda")


def model_on(device: str, loaded: LoadedFn) -> LoadedModel:
    return cuda_model() if device == "cuda" else loaded("tiny-llama")


def exported_layers(model: LoadedModel, prompt: list[int], device: str = "cpu",
                    ) -> tuple[int, list[torch.Tensor]]:
    """(first token, the prompt's KV layers) from a prefill-only request on another engine."""
    prefill = LLMEngine(model, EngineConfig(device=device, async_output=False))
    prefill.add_request("p", prompt, GREEDY, prefill_only=True)
    (out,) = prefill.step()
    export = prefill.export_kv("p")
    layers = [export.layer(i) for i in range(export.layout.num_layers)]
    prefill.release_kv("p")
    return out.new_token_ids[0], layers


def alone(model: LoadedModel, prompt: list[int], device: str = "cpu") -> list[int]:
    engine = LLMEngine(model, EngineConfig(device=device, async_output=False))
    return list(engine.generate([prompt], GREEDY)[0].output_token_ids)


def collect(outs: list[RequestOutput], tokens: dict[str, list[int]]) -> None:
    for out in outs:
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)


def assert_all_free(engine: LLMEngine) -> None:
    engine.block_manager.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")),
])
def test_running_streams_decode_while_an_import_is_blocked(loaded: LoadedFn, device: str) -> None:
    model = model_on(device, loaded)
    prompt = make_prompt(7, 40)
    first, layers = exported_layers(model, prompt, device)
    source = GatedSource(len(prompt), layers)
    # outputs step by step (async_output, on by default on CUDA, would shift them by one)
    engine = LLMEngine(model, EngineConfig(kv_import_timeout_s=10.0, device=device,
                                           async_output=False))
    tokens: dict[str, list[int]] = {}
    try:
        for rid, p in NEIGHBOURS.items():
            engine.add_request(rid, p, GREEDY)
        collect(engine.step(), tokens)  # the neighbours' prefill and first tokens
        engine.add_request("d", prompt, GREEDY, kv_source=source, prior_output_ids=[first])
        source.open(0)
        for _ in range(5):  # a blocking import would sit in read_layer(1) until its deadline
            outs = engine.step()
            assert sorted(o.request_id for o in outs) == sorted(NEIGHBOURS)
            # the import thread starts with the first step: let it reach the gate at layer 1
            wait_until(lambda: source.reads == [0, 1])
            assert (source.reads, source.delivered, source.failures) == ([0, 1], [0], [])
            collect(outs, tokens)
        assert {rid: len(t) for rid, t in tokens.items()} == {rid: 6 for rid in NEIGHBOURS}
        importing = list(engine.scheduler.importing)
        assert [(s.request_id, s.status) for s in importing] == [("d", SeqStatus.WAITING_FOR_KV)]
        source.open()
        finals = {}
        while engine.has_unfinished():
            outs = engine.step()
            collect(outs, tokens)
            finals.update({o.request_id: o for o in outs if o.finished})
    finally:
        engine.close()
    assert [first, *tokens["d"]] == alone(model, prompt, device)
    for rid, p in NEIGHBOURS.items():
        assert tokens[rid] == alone(model, p, device)
    assert finals["d"].num_cached_tokens == 40
    assert_all_free(engine)


def test_abort_while_importing_frees_the_blocks_after_the_reader_stops(loaded: LoadedFn) -> None:
    prompt = make_prompt(8, 40)
    first, layers = exported_layers(loaded("tiny-llama"), prompt)
    source = GatedSource(len(prompt), layers)
    engine = LLMEngine(loaded("tiny-llama"), EngineConfig(num_blocks=32))
    tokens: dict[str, list[int]] = {}
    try:
        engine.add_request("n0", NEIGHBOURS["n0"], GREEDY)  # 9 tokens: 1 block, then 2
        engine.add_request("d", prompt, GREEDY, kv_source=source, prior_output_ids=[first])
        collect(engine.step(), tokens)
        wait_until(lambda: source.reads == [0])
        assert engine.block_manager.num_free_blocks == 32 - 1 - 3
        engine.abort("d")
        outs = engine.step()
        collect(outs, tokens)
        assert [(o.request_id, o.finish_reason) for o in outs if o.finished] == [("d", "abort")]
        assert engine.block_manager.num_free_blocks == 32 - 1 - 3  # reserved: the reader is in
        assert engine.scheduler.num_orphaned_imports == 1
        source.open()
        while engine.has_unfinished():
            collect(engine.step(), tokens)
        assert source.delivered == [0] and engine.scheduler.num_orphaned_imports == 0
        assert engine.block_manager.num_free_blocks == 32  # n0 finished, the orphan freed once
    finally:
        engine.close()
    assert tokens == {"n0": alone(loaded("tiny-llama"), NEIGHBOURS["n0"]), "d": []}
    assert_all_free(engine)


def test_late_import_recomputes_the_same_tokens(loaded: LoadedFn) -> None:
    prompt = make_prompt(9, 40)
    first, layers = exported_layers(loaded("tiny-llama"), prompt)
    source = GatedSource(len(prompt), layers, honour_deadline=False)
    engine = LLMEngine(loaded("tiny-llama"), EngineConfig(kv_import_timeout_s=0.2))
    tokens: dict[str, list[int]] = {}
    try:
        engine.add_request("d", prompt, GREEDY, kv_source=source, prior_output_ids=[first])
        finals = {}
        while "d" not in finals:  # the reader never returns on its own: the deadline ends it
            outs = engine.step()
            collect(outs, tokens)
            finals.update({o.request_id: o for o in outs if o.finished})
        assert engine.scheduler.num_orphaned_imports == 1  # its blocks are still reserved
        source.open()
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.close()
    assert [first, *tokens["d"]] == alone(loaded("tiny-llama"), prompt)
    assert finals["d"].num_cached_tokens == 0
    assert_all_free(engine)
