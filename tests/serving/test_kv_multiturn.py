"""Multi-turn reuse after a disaggregated turn: the decode node indexes the whole chain.

Node A prefills the prompt and publishes its KV; node B imports it and generates. B's store
must then hold prompt + reply as one chain (the imported blocks are reported, the generated
ones extend them), so a second turn (prompt + reply + new text) sent to B loads every full
block of prompt + reply and still produces exactly a cache-free engine's tokens. Block
accounting (engine block managers, pool allocators, stores) is checked after each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.outputs import RequestOutput
from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from backends.serving.engine_spec import EngineSpec
from backends.serving.kv import NodeTransfer, build_worker

TOK = byte_level_tokenizer()
SPEC = EngineSpec(source="tiny-llama", num_blocks=64, max_model_len=256, max_num_seqs=8)
PROMPT = TOK.encode("The quick brown fox jumps over the lazy dog, twice")  # 50 tokens
MORE = TOK.encode(" And then?")  # 10 tokens
TURN1 = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
TURN2 = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

Worker = tuple[LLMEngine, NodeTransfer]


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[Worker, Worker]]:
    a = build_worker(SPEC, "node-a")
    b = build_worker(SPEC, "node-b")
    yield a, b
    a[1].close()
    b[1].close()


@pytest.fixture(scope="module")
def fresh() -> LLMEngine:
    return LLMEngine("tiny-llama", EngineConfig(block_size=16, num_blocks=64, max_model_len=256))


def run(engine: LLMEngine) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def disaggregated_turn(a: Worker, b: Worker, rid: str, prompt: list[int]) -> list[int]:
    """Prefill-only on A, publish, import and decode on B; the reply's token ids."""
    engine, transfer = a
    engine.add_request(rid, prompt, TURN1, prefill_only=True)
    [out] = run(engine)
    handle = transfer.publish(engine.export_kv(rid), prompt).handle
    engine.release_kv(rid)
    first = out.new_token_ids[0]
    engine, transfer = b
    engine.add_request(rid, prompt, TURN1, kv_source=transfer.source(handle), prior_output_ids=[first])
    return [first] + [t for o in run(engine) for t in o.new_token_ids]


def assert_no_leak(*workers: Worker) -> None:
    for engine, transfer in workers:
        transfer.maintain()
        transfer.node.check_integrity()
        engine.block_manager.check_integrity()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
        assert len(transfer.node.leases) == 0


def test_second_turn_on_the_decode_node_reuses_prompt_and_reply(
        workers: tuple[Worker, Worker], fresh: LLMEngine) -> None:
    a, b = workers
    [oracle] = fresh.generate([PROMPT], TURN1)
    reply = disaggregated_turn(a, b, "turn1", PROMPT)
    assert reply == list(oracle.output_token_ids)
    history = PROMPT + reply  # 90 tokens; the last reply token's KV was never computed: 89
    node = b[1].node
    match = node.store.lookup(node.hashes(history))
    assert (match.num_blocks, match.tiers) == (5, ("hot",) * 5)  # 80 tokens: 3 imported + 2 generated
    assert_no_leak(a, b)

    turn2 = history + MORE  # 100 tokens
    [expected] = fresh.generate([turn2], TURN2)
    b[0].add_request("turn2", turn2, TURN2)
    outs = run(b[0])
    assert [t for o in outs for t in o.new_token_ids] == list(expected.output_token_ids)
    assert (outs[-1].finished, outs[-1].num_cached_tokens) == (True, 80)
    assert_no_leak(a, b)


def test_repeating_a_turn_stores_nothing_twice(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    first = disaggregated_turn(a, b, "once", PROMPT + MORE)
    node = b[1].node
    num_free = node.allocator.num_free
    chain = node.store.lookup(node.hashes(PROMPT + MORE + first))
    assert chain.num_blocks == 6  # 60 imported tokens (3 full blocks) + 40 generated - 1: 99 -> 6
    again = disaggregated_turn(a, b, "twice", PROMPT + MORE)
    assert again == first
    assert node.allocator.num_free == num_free  # every block already stored: no new slot kept
    assert node.store.lookup(node.hashes(PROMPT + MORE + first)) == chain
    assert_no_leak(a, b)
