"""A later turn handed off to a decode node that holds its history pulls only the blocks it lacks.

Two engines, two kvbridge nodes, real transports (shm and tcp). Turn 1 runs prefill -> decode;
the decode node's store then holds the prompt's and the reply's full blocks. Turn 2 (turn 1 +
reply + new text) is prefilled on the prefill node and handed off again: the decode node reads
the blocks it holds from its own pool and pulls only the others, and continues token for token
as one engine would; nothing stays leased or in use.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from backends.serving.engine_spec import EngineSpec
from backends.serving.kv import EngineSource, NodeTransfer, build_worker
from kvbridge import pull
from kvbridge.handle import KVHandle
from kvbridge.pull import PrefixSource

TOK = byte_level_tokenizer()
SPEC = EngineSpec(source="tiny-llama", num_blocks=64, max_model_len=256, max_num_seqs=8)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
BLOCK_BYTES_ALL_LAYERS = 16 * 4 * 128 * 4  # block_size * num_layers * kv_width * float32

Worker = tuple[LLMEngine, NodeTransfer]


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[Worker, Worker]]:
    prefill = build_worker(SPEC, "prefill")
    decode = build_worker(SPEC, "decode")
    yield prefill, decode
    prefill[1].close()
    decode[1].close()


def run(engine: LLMEngine) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens.extend(t for out in engine.step() for t in out.new_token_ids)
    return tokens


def reference(prompt: list[int]) -> list[int]:
    engine = LLMEngine("tiny-llama", EngineConfig(block_size=16, num_blocks=64, max_model_len=256))
    [result] = engine.generate([prompt], GREEDY)
    return list(result.output_token_ids)


def hand_off(prefill: Worker, decode: Worker, rid: str, prompt: list[int]) -> tuple[list[int], EngineSource]:
    """(tokens, the decode side's source) of one prefill -> decode request."""
    engine, transfer = prefill
    engine.add_request(rid, prompt, GREEDY, prefill_only=True)
    [first] = run(engine)
    published = transfer.publish(engine.export_kv(rid), prompt)
    engine.release_kv(rid)
    assert len(KVHandle.from_bytes(published.handle).block_slots) == -(-len(prompt) // 16)
    source = decode[1].source(published.handle)
    decode[0].add_request(rid, prompt, GREEDY, kv_source=source, prior_output_ids=[first])
    tokens = [first] + run(decode[0])
    source.close()
    return tokens, source


def assert_no_leak(*workers: Worker) -> None:
    for engine, transfer in workers:
        transfer.maintain()
        transfer.node.check_integrity()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
        assert len(transfer.node.leases) == 0
        assert transfer.node.store.stats().active.num_blocks == 0


@pytest.mark.parametrize("path", ["shm", "tcp"])
def test_second_turn_pulls_only_the_blocks_the_decode_node_lacks(
        workers: tuple[Worker, Worker], monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    prefill, dec = workers
    if path == "tcp":
        monkeypatch.setattr(pull, "shm_reachable", lambda handle: False)
    turn1 = TOK.encode(f"Turn one over {path}, a conversation that the decode node will remember.")[:60]
    turn1 += TOK.encode(" " * (60 - len(turn1)))
    tokens1, source1 = hand_off(prefill, dec, f"t1-{path}", turn1)
    assert tokens1 == reference(turn1)
    assert source1.inner.num_pulled_bytes == 4 * BLOCK_BYTES_ALL_LAYERS  # 60 tokens: 3 full + 1 partial
    # KV of turn 1's 60 + 11 reply tokens (the last one is never computed): 4 full blocks held
    assert dec[1].node.store.lookup(dec[1].node.hashes(turn1 + tokens1)).num_blocks == 4

    turn2 = turn1 + tokens1 + TOK.encode(" And what happened next, in a few words?")[:30]
    assert len(turn2) == 102  # 6 full blocks + a partial one
    tokens2, source2 = hand_off(prefill, dec, f"t2-{path}", turn2)
    assert tokens2 == reference(turn2)
    inner = source2.inner
    assert isinstance(inner, PrefixSource)
    assert (inner.num_local, inner.num_pulled_bytes, inner.transport_name) == \
        (4, 3 * BLOCK_BYTES_ALL_LAYERS, path)  # blocks 4, 5 and the partial 6
    assert source2.num_pulled_bytes == 3 * BLOCK_BYTES_ALL_LAYERS
    assert_no_leak(prefill, dec)

