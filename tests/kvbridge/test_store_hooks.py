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


def make_store(hot: HostBlockPool, cold: HostBlockPool) -> BlockStore:
    return BlockStore(
        StoreConfig(hot_capacity_blocks=4, cold_capacity_blocks=16),
        InMemorySlotAllocator(8),
        InMemorySlotAllocator(16),
        PoolMover(hot.layout.num_layers, hot, cold),
    )


def make_engine(
    model: LoadedModel, hot: HostBlockPool, cold: HostBlockPool, deferred: bool = False
) -> tuple[LLMEngine, BlockStore]:
    store = make_store(hot, cold)
    hooks = StoreKVHooks(store, hot, BLOCK_SIZE, extra_key="tiny-llama", deferred=deferred)
    engine = LLMEngine(model, EngineConfig(block_size=BLOCK_SIZE, num_blocks=64), hooks=hooks)
    return engine, store


DEFERRED = pytest.mark.parametrize("deferred", [False, True], ids=["at-once", "deferred"])


@DEFERRED
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mla"], indirect=True)
def test_repeated_prompt_loads_the_stored_prefix(
    model: LoadedModel, pools: tuple[HostBlockPool, HostBlockPool], deferred: bool
) -> None:
    ids = prompt(3, 22)
    plain = LLMEngine(model, EngineConfig(block_size=BLOCK_SIZE, num_blocks=64))
    expected = [t for o in run(plain, "p", ids) for t in o.new_token_ids]
    engine, store = make_engine(model, *pools, deferred)

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


@DEFERRED
def test_preempted_requests_reuse_their_own_published_blocks(
    model: LoadedModel, pools: tuple[HostBlockPool, HostBlockPool], deferred: bool
) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = {"x": prompt(7, 16), "y": prompt(8, 16)}
    config = EngineConfig(block_size=BLOCK_SIZE, num_blocks=12, max_num_batched_tokens=64)
    plain = LLMEngine(model, config)
    expected = {
        rid: list(o.output_token_ids)
        for rid, o in zip(prompts, plain.generate(list(prompts.values()), params), strict=True)
    }
    engine, store = make_engine(model, *pools, deferred)
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


def test_deferred_reports_publish_at_the_next_hook_call_in_order(
    model: LoadedModel, pools: tuple[HostBlockPool, HostBlockPool]
) -> None:
    """Deferred copies: a report is published by the next hook call, a second report of the
    same chain continues it before the first is published, request_finished publishes what
    is left before releasing, and the pool holds exactly the engine's KV."""
    hot, cold = pools
    engine, store = make_engine(model, hot, cold, deferred=True)
    hooks = engine.hooks
    assert isinstance(hooks, StoreKVHooks)
    ids = prompt(11, 12)  # 3 full blocks
    engine.add_request("r", ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    outputs = [t for o in engine.step() for t in o.new_token_ids]  # prefill: blocks 0-2
    assert hooks.num_exports_in_flight == 1 and store.held_blocks("r") == 0
    table = list(engine._seqs["r"].block_table)
    expected = [engine.cache_access.read_blocks(layer, table[:3]).view(torch.uint8)
                .reshape(3, -1).numpy().copy() for layer in range(hot.layout.num_layers)]
    for _ in range(4):  # tokens 12-15: block 3 completes in the 4th step
        outputs += [t for o in engine.step() for t in o.new_token_ids]
    assert store.held_blocks("r") == 3 and hooks.num_exports_in_flight == 1  # block 3 in flight
    slots = list(store.lookup(hooks._chain("r", ids)).slots)
    for layer, data in enumerate(expected):
        assert (hot.layer(layer)[slots] == data).all()
    while engine.has_unfinished():  # the end: request_finished publishes block 3, releases
        outputs += [t for o in engine.step() for t in o.new_token_ids]
    assert hooks.num_exports_in_flight == 0 and store.held_blocks("r") == 0
    assert store.lookup(hooks._chain("x", (ids + outputs)[:16])).num_blocks == 4
    store.check_integrity()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream copy needs CUDA")
def test_cuda_reports_copy_off_the_step_path(
    pools: tuple[HostBlockPool, HostBlockPool]
) -> None:
    """On a CUDA cache the hooks copy on a side stream (deferred by default); a repeated
    prompt then loads the published prefix and decodes the same tokens."""
    model = load_model("tiny-llama", device="cuda")
    config = EngineConfig(block_size=BLOCK_SIZE, num_blocks=64, device="cuda")
    ids = prompt(3, 22)
    expected = [t for o in run(LLMEngine(model, config), "p", ids) for t in o.new_token_ids]
    store = make_store(*pools)
    hooks = StoreKVHooks(store, pools[0], BLOCK_SIZE, extra_key="tiny-llama")
    engine = LLMEngine(model, config, hooks=hooks)
    first = run(engine, "a", ids)
    assert hooks.num_exports_in_flight == 0
    second = run(engine, "b", ids)
    assert [t for o in second for t in o.new_token_ids] == expected
    assert [t for o in first for t in o.new_token_ids] == expected
    assert second[-1].num_cached_tokens == 20
    store.check_integrity()
