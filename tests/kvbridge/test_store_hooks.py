"""StoreKVHooks with the real engine: a repeated prompt reuses the stored prefix KV."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.loader import LoadedModel, load_model
from backends.engine.outputs import RequestOutput
from backends.engine.sampling_params import SamplingParams
from kvbridge.hooks import PoolMover, StoreKVHooks
from kvbridge.pool import HostBlockPool, PoolLayout
from kvbridge.store import BlockStore
from kvbridge.tiers import InMemorySlotAllocator, StoreConfig

BLOCK_SIZE = 4
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(request: pytest.FixtureRequest) -> LoadedModel:
    return load_model(getattr(request, "param", "tiny-llama"))


def prompt(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(3, 259, (length,), generator=gen)]


def run(engine: LLMEngine, request_id: str, ids: list[int]) -> list[RequestOutput]:
    engine.add_request(request_id, ids, PARAMS)
    outs: list[RequestOutput] = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


@pytest.fixture
def pools(model: LoadedModel) -> Iterator[tuple[HostBlockPool, HostBlockPool]]:
    plain = LLMEngine(model, EngineConfig(block_size=BLOCK_SIZE, num_blocks=64))
    layout = plain.kv_layout
    block_bytes = BLOCK_SIZE * layout.bytes_per_token_per_layer
    hot = HostBlockPool.create(PoolLayout(layout.num_layers, 8, block_bytes))
    cold = HostBlockPool.create(PoolLayout(layout.num_layers, 16, block_bytes))
    yield hot, cold
    hot.close()
    cold.close()


def make_engine(
    model: LoadedModel, hot: HostBlockPool, cold: HostBlockPool
) -> tuple[LLMEngine, BlockStore]:
    num_layers = hot.layout.num_layers
    store = BlockStore(
        StoreConfig(hot_capacity_blocks=4, cold_capacity_blocks=16),
        InMemorySlotAllocator(8),
        InMemorySlotAllocator(16),
        PoolMover(num_layers, hot, cold),
    )
    hooks = StoreKVHooks(store, hot, BLOCK_SIZE, extra_key="tiny-llama")
    engine = LLMEngine(model, EngineConfig(block_size=BLOCK_SIZE, num_blocks=64), hooks=hooks)
    return engine, store


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mla"], indirect=True)
def test_repeated_prompt_loads_the_stored_prefix(
    model: LoadedModel, pools: tuple[HostBlockPool, HostBlockPool]
) -> None:
    ids = prompt(3, 22)
    plain = LLMEngine(model, EngineConfig(block_size=BLOCK_SIZE, num_blocks=64))
    expected = [t for o in run(plain, "p", ids) for t in o.new_token_ids]
    engine, store = make_engine(model, *pools)

    first = run(engine, "a", ids)
    assert [t for o in first for t in o.new_token_ids] == expected
    assert first[-1].num_cached_tokens == 0
    store.check_integrity()
    # 22 prompt + 6 output tokens, the last not yet computed: 6 full blocks, hot keeps 4.
    stats = store.stats()
    assert (stats.active.num_blocks, stats.hot.num_blocks, stats.cold.num_blocks) == (0, 4, 2)

    second = run(engine, "b", ids)
    assert [t for o in second for t in o.new_token_ids] == expected
    assert second[-1].num_cached_tokens == 20  # 5 full blocks (< 22 tokens)
    store.check_integrity()
    stats = store.stats()
    # blocks 0-3 were in hot, block 4 in cold (promoted), block 5 stays in cold
    assert (stats.cold.hits, stats.cold.promotions, stats.hot.hit_blocks) == (1, 1, 4)
    engine.block_manager.check_integrity()


def test_a_different_namespace_does_not_share(
    model: LoadedModel, pools: tuple[HostBlockPool, HostBlockPool]
) -> None:
    engine, store = make_engine(model, *pools)
    run(engine, "a", prompt(4, 12))
    hooks = StoreKVHooks(store, pools[0], BLOCK_SIZE, extra_key="other-model")
    assert hooks.lookup_prefix("x", prompt(4, 12)) == 0
    assert engine.hooks is not None
    assert engine.hooks.lookup_prefix("x", prompt(4, 12)) == 8


def test_preempted_requests_reuse_their_own_published_blocks(
    model: LoadedModel, pools: tuple[HostBlockPool, HostBlockPool]
) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = {"x": prompt(7, 16), "y": prompt(8, 16)}
    config = EngineConfig(block_size=BLOCK_SIZE, num_blocks=12, max_num_batched_tokens=64)
    plain = LLMEngine(model, config)
    expected = {
        rid: list(o.output_token_ids)
        for rid, o in zip(prompts, plain.generate(list(prompts.values()), params), strict=True)
    }
    engine, store = make_engine(model, *pools)
    engine = LLMEngine(model, config, hooks=engine.hooks)
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    cached: dict[str, int] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            cached[out.request_id] = out.num_cached_tokens
    assert engine.scheduler.num_preemptions == 1  # y is preempted once, then re-admitted
    assert got == expected
    assert cached == {"x": 0, "y": 16}  # y reloads the 4 blocks it had published
    store.check_integrity()
    engine.block_manager.check_integrity()
    assert store.stats().active.num_blocks == 0
