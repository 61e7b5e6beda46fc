"""Abort, prefill-only holding, KV import failure -> recompute, and the KVHooks calls."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from conftest import LoadedFn, make_prompt

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.hooks import KVCacheAccess, KVImportError
from backends.engine.kv_transfer import TensorKVSource
from backends.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def drain(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def assert_all_free(engine: LLMEngine) -> None:
    engine.block_manager.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_abort_at_any_time_frees_blocks(loaded: LoadedFn) -> None:
    engine = LLMEngine(
        loaded("tiny-llama"), EngineConfig(max_num_batched_tokens=16, max_num_seqs=2)
    )
    for i in range(4):
        engine.add_request(f"r{i}", make_prompt(i, 40), GREEDY)
    engine.step()  # r0 mid-prefill, the rest waiting
    engine.abort("r3")  # waiting
    engine.abort("r0")  # mid-prefill
    finals = engine.step()
    assert [(o.request_id, o.finish_reason, o.finished) for o in finals] == [
        ("r3", "abort", True),
        ("r0", "abort", True),
    ]
    for _ in range(6):
        engine.step()
    engine.abort("r1")  # decoding
    engine.abort("r1")  # twice: ignored
    engine.abort("unknown")  # ignored
    drain(engine)
    assert_all_free(engine)


def test_prefill_only_holds_blocks_until_release(loaded: LoadedFn) -> None:
    engine = LLMEngine(loaded("tiny-llama"))
    engine.add_request("p", make_prompt(1, 33), GREEDY, prefill_only=True)
    engine.add_request("one", make_prompt(2, 5), SamplingParams(max_tokens=1), prefill_only=True)
    outs = [o for o in engine.step()]
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [
        ("p", True, None),
        ("one", True, "length"),
    ]
    assert not engine.has_unfinished()
    total = engine.block_manager.num_total_blocks
    assert engine.block_manager.num_free_blocks == total - 3 - 1
    export = engine.export_kv("p")
    assert (export.num_tokens, len(export.block_ids), export.layer(0).shape) == (
        33,
        3,
        torch.Size([3, 16, engine.kv_layout.kv_width]),
    )
    engine.release_kv("p")
    engine.abort("one")  # abort of a held request releases it
    assert_all_free(engine)


class FailingSource:
    """A KV source whose transfer breaks at layer 2."""

    def __init__(self, num_tokens: int, block_shape: tuple[int, int]) -> None:
        self.num_tokens = num_tokens
        self.reads: list[int] = []

    def read_layer(self, layer: int, dst: torch.Tensor, deadline: float) -> None:
        self.reads.append(layer)
        if layer == 2:
            raise KVImportError("peer went away")
        dst.fill_(7.0)  # garbage: must be recomputed over


def test_kv_import_error_recomputes(loaded: LoadedFn) -> None:
    engine = LLMEngine(loaded("tiny-mla"))
    prompt = make_prompt(3, 70)
    whole = engine.generate([prompt], GREEDY)[0].output_token_ids
    source = FailingSource(len(prompt), (64, engine.kv_layout.kv_width))
    engine.add_request("d", prompt, GREEDY, kv_source=source, prior_output_ids=[whole[0]])
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert source.reads == [0, 1, 2]
    assert [whole[0]] + [t for o in outs for t in o.new_token_ids] == list(whole)
    assert outs[-1].num_cached_tokens == 0
    assert_all_free(engine)


class MemoryStore:
    """A minimal in-process KVHooks implementation keyed by the token prefix of each block."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self.calls: list[tuple[str, str, int, list[int]]] = []

    def lookup_prefix(self, request_id: str, token_ids: Sequence[int]) -> int:
        n = 0
        while (
            n + self.block_size < len(token_ids)
            and tuple(token_ids[: n + self.block_size]) in self.blocks
        ):
            n += self.block_size
        return n

    def load_prefix(
        self,
        request_id: str,
        token_ids: Sequence[int],
        block_ids: Sequence[int],
        cache: KVCacheAccess,
    ) -> int:
        self.calls.append(("load", request_id, len(token_ids), list(block_ids)))
        for i, block_id in enumerate(block_ids):
            layers = self.blocks[tuple(token_ids[: (i + 1) * self.block_size])]
            for layer, data in enumerate(layers):
                cache.write_blocks(layer, [block_id], data[None])
        return len(token_ids)

    def blocks_computed(
        self,
        request_id: str,
        token_ids: Sequence[int],
        block_ids: Sequence[int],
        cache: KVCacheAccess,
    ) -> None:
        self.calls.append(("computed", request_id, len(token_ids), list(block_ids)))
        first = len(token_ids) // self.block_size - len(block_ids)
        for i, block_id in enumerate(block_ids):
            end = (first + i + 1) * self.block_size
            self.blocks[tuple(token_ids[:end])] = [
                cache.read_blocks(layer, [block_id])[0] for layer in range(cache.layout.num_layers)
            ]

    def request_finished(self, request_id: str) -> None:
        self.calls.append(("finished", request_id, 0, []))


def test_hooks_publish_full_blocks_and_load_prefixes(loaded: LoadedFn) -> None:
    store = MemoryStore(block_size=16)
    engine = LLMEngine(loaded("tiny-llama"), EngineConfig(num_blocks=32), hooks=store)
    prompt = make_prompt(4, 40)
    engine.add_request("a", prompt, GREEDY)
    first = drain(engine)["a"]
    assert store.calls == [
        ("computed", "a", 32, [0, 1]),
        ("computed", "a", 48, [2]),
        ("finished", "a", 0, []),
    ]
    store.calls.clear()
    engine.add_request("b", prompt, GREEDY)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [t for o in outs for t in o.new_token_ids] == first
    assert outs[-1].num_cached_tokens == 32
    assert store.calls[0][:3] == ("load", "b", 32)
    assert store.calls[-1] == ("finished", "b", 0, [])
    assert_all_free(engine)


def test_imported_blocks_are_reported_so_a_second_turn_reuses_the_reply(loaded: LoadedFn) -> None:
    prefill = LLMEngine(loaded("tiny-llama"), EngineConfig(num_blocks=32))
    prompt = make_prompt(5, 40)  # 2 full blocks + 8 tokens
    fresh = LLMEngine(loaded("tiny-llama"), EngineConfig(num_blocks=32))
    whole = fresh.generate([prompt], GREEDY)[0].output_token_ids
    prefill.add_request("p", prompt, GREEDY, prefill_only=True)
    [first] = drain(prefill)["p"]
    export = prefill.export_kv("p")
    source = TensorKVSource(export.num_tokens, [export.layer(i) for i in range(4)])
    prefill.release_kv("p")
    store = MemoryStore(block_size=16)
    decode = LLMEngine(loaded("tiny-llama"), EngineConfig(num_blocks=32), hooks=store)
    decode.add_request("d", prompt, GREEDY, kv_source=source, prior_output_ids=[first])
    assert [first] + drain(decode)["d"] == list(whole)
    # 40 imported tokens (2 full blocks) when it joins the batch; 49 computed of 50 -> block 2.
    assert store.calls == [
        ("computed", "d", 32, [0, 1]),
        ("computed", "d", 48, [2]),
        ("finished", "d", 0, []),
    ]
    assert_all_free(decode)
    store.calls.clear()
    turn2 = [*prompt, *whole, *make_prompt(6, 7)]  # 57 tokens
    expected = fresh.generate([turn2], GREEDY)[0].output_token_ids
    decode.add_request("t2", turn2, GREEDY)
    outs = []
    while decode.has_unfinished():
        outs += decode.step()
    assert [t for o in outs for t in o.new_token_ids] == list(expected)
    assert outs[-1].num_cached_tokens == 48
    assert store.calls[0] == ("load", "t2", 48, [4, 5, 6])  # the free list is FIFO
    assert_all_free(decode)
