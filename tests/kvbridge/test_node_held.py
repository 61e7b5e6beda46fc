"""KVNode.open pulls only the blocks this node lacks: the leading blocks of a handle's chain that
the consumer's store holds are leased and read from its own pool, the rest pulled from the
producer over shm and over tcp (the transports move only those: TransferSpec.num_held). The
producer's lease ends as after a whole pull; the consumer's lease ends after the last layer, on
failure and on close; nothing stays in use."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator

import pytest
import torch
from kv_exports import Export, random_export

import kvbridge.pull
from kvbridge import KVLayoutSpec, KVNode, KVNodeConfig, PullFailed
from kvbridge.handle import KVHandle
from kvbridge.pull import PrefixSource, PulledKVSource
from kvbridge.transport.base import TransferSpec
from kvbridge.transport.messages import PullRequest

LAYOUT = KVLayoutSpec("float32", 3, 4, 8, 32)  # 3 layers, 4 tokens a block, 8 floats a token
BLOCK_BYTES_ALL_LAYERS = LAYOUT.block_bytes * LAYOUT.num_layers  # 384
PROMPT = list(range(300, 322))  # 22 tokens: 5 full blocks and a partial one


def export(rid: str, num_tokens: int, seed: int) -> Export:
    return random_export(rid, num_tokens, seed, LAYOUT)


@pytest.fixture
def nodes() -> Iterator[tuple[KVNode, KVNode]]:
    producer = KVNode(KVNodeConfig("producer", "m", 16, 8), LAYOUT)
    consumer = KVNode(KVNodeConfig("consumer", "m", 16, 8), LAYOUT)
    yield producer, consumer
    consumer.close()
    producer.close()


@pytest.fixture(params=["shm", "tcp"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[TransferSpec]]:
    """Forces the pull's transport; yields the specs the consumer's pulls started with (and
    checks that they all went over that transport)."""
    name = request.param
    monkeypatch.setattr(kvbridge.pull, "pull_transport", lambda handle, wanted="auto": name)
    specs: list[TransferSpec] = []
    used: list[str] = []
    for cls in (kvbridge.pull.ShmTransport, kvbridge.pull.TcpTransport):
        original = cls.start_recv

        def spy(self: object, spec: TransferSpec, dest: object, _original: object = original) -> object:
            specs.append(spec)
            used.append(self.name)  # type: ignore[attr-defined]
            return _original(self, spec, dest)  # type: ignore[operator]

        monkeypatch.setattr(cls, "start_recv", spy)
    yield specs
    assert used == [name] * len(specs)


def hold(consumer: KVNode, num_tokens: int, seed: int) -> Export:
    """The consumer's store holds PROMPT's first ``num_tokens // 4`` blocks (from an earlier
    request of its own, KV ``seed``) as history."""
    exp = export("earlier", num_tokens, seed)
    consumer.publish(exp, PROMPT)
    assert consumer.discard("earlier")
    return exp


def read_all(source: object, num_blocks: int) -> list[torch.Tensor]:
    out = []
    for layer in range(LAYOUT.num_layers):
        dst = torch.empty(num_blocks, LAYOUT.block_size, LAYOUT.kv_width)
        source.read_layer(layer, dst, time.monotonic() + 10)  # type: ignore[attr-defined]
        out.append(dst)
    return out


def settle(node: KVNode) -> None:
    """Waits (bounded) until the block server reported every ended pull, then releases."""
    deadline = time.monotonic() + 5
    while len(node.leases) and time.monotonic() < deadline:
        node.maintain()
        time.sleep(0.01)


def active_blocks(node: KVNode) -> int:
    return node.store.stats().active.num_blocks


def test_only_the_blocks_the_consumer_lacks_are_pulled(nodes: tuple[KVNode, KVNode],
                                                       transport: list[TransferSpec]) -> None:
    producer, consumer = nodes
    local = hold(consumer, 12, seed=7)  # 3 of the 5 full blocks, KV unlike the producer's
    exp = export("turn", 22, seed=1)
    handle = producer.publish(exp, PROMPT).handle
    assert (len(handle.block_slots), len(handle.block_hashes)) == (6, 5)

    source = consumer.open(handle.to_bytes())
    assert isinstance(source, PrefixSource) and source.num_local == 3 and source.num_tokens == 22
    assert source.num_pulled_bytes == 3 * BLOCK_BYTES_ALL_LAYERS  # blocks 3, 4 and the partial 5
    assert active_blocks(consumer) == 3  # leased while the source is open
    got = read_all(source, 6)
    # the first 3 blocks are the consumer's own copy, the rest what the producer holds
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(got[layer][:3], local.layers[layer][:3])
        assert torch.equal(got[layer][3:], exp.layers[layer][3:])
    [spec] = transport
    assert (spec.num_held, spec.source_slots, spec.moved_slots, spec.layer_nbytes) == \
        (3, handle.block_slots, handle.block_slots[3:], 3 * LAYOUT.block_bytes)
    assert source.elapsed_ns > 0 and consumer.import_counts == {"device": 0, "host": 1, "remote": 0}
    assert active_blocks(consumer) == 0  # released after the last layer, before close
    source.close()
    settle(producer)
    assert len(producer.leases) == 0 and active_blocks(producer) == 0  # the partial pull ended its lease
    producer.check_integrity()
    consumer.check_integrity()


def test_bytes_equal_the_producers_whatever_the_consumer_holds(nodes: tuple[KVNode, KVNode],
                                                                transport: list[TransferSpec]) -> None:
    producer, consumer = nodes
    exp = export("turn", 22, seed=3)
    handle = producer.publish(exp, PROMPT).handle
    # the consumer holds the same KV for the first 2 blocks (e.g. computed by the same model)
    consumer.publish(dataclasses.replace(exp, request_id="earlier", num_tokens=8,
                                         layers=[x[:2] for x in exp.layers], block_ids=(0, 1)), PROMPT)
    consumer.discard("earlier")
    source = consumer.open(handle.to_bytes())
    got = read_all(source, 6)
    source.close()
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(got[layer], exp.layers[layer])
    assert [(s.num_held, len(s.moved_slots)) for s in transport] == [(2, 4)]
    settle(producer)
    assert (len(producer.leases), active_blocks(producer), active_blocks(consumer)) == (0, 0, 0)
    consumer.check_integrity()


def test_a_consumer_holding_nothing_pulls_the_whole_handle(nodes: tuple[KVNode, KVNode],
                                                          transport: list[TransferSpec]) -> None:
    producer, consumer = nodes
    exp = export("turn", 22, seed=4)
    handle = producer.publish(exp, PROMPT).handle
    source = consumer.open(handle.to_bytes())
    assert isinstance(source, PulledKVSource) and source.num_pulled_bytes == 6 * BLOCK_BYTES_ALL_LAYERS
    got = read_all(source, 6)
    assert all(torch.equal(g, e) for g, e in zip(got, exp.layers, strict=True))
    assert [(s.num_held, len(s.moved_slots)) for s in transport] == [(0, 6)]
    settle(producer)
    assert len(producer.leases) == 0
    consumer.check_integrity()


def test_a_consumer_holding_every_block_moves_nothing_and_ends_the_producers_lease(
        nodes: tuple[KVNode, KVNode], transport: list[TransferSpec]) -> None:
    producer, consumer = nodes
    local = hold(consumer, 20, seed=8)
    handle = producer.publish(export("turn", 20, seed=5), PROMPT).handle  # 5 full blocks, no partial
    source = consumer.open(handle.to_bytes())
    assert isinstance(source, PrefixSource) and (source.num_local, source.num_pulled_bytes) == (5, 0)
    got = read_all(source, 5)
    assert all(torch.equal(g, e) for g, e in zip(got, local.layers, strict=True))
    assert transport == []  # no transfer started
    settle(producer)  # a pin without a byte (TcpTransport.release) told the producer
    assert (len(producer.leases), active_blocks(producer), active_blocks(consumer)) == (0, 0, 0)
    producer.check_integrity()
    consumer.check_integrity()


def dead(handle: KVHandle) -> KVHandle:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    return dataclasses.replace(handle, source_endpoint=f"127.0.0.1:{closed}", pool_name="")


def test_a_failed_pull_releases_the_consumers_lease_at_once(nodes: tuple[KVNode, KVNode]) -> None:
    producer, consumer = nodes
    hold(consumer, 12, seed=7)
    handle = producer.publish(export("turn", 22, seed=1), PROMPT).handle
    source = consumer.open(dead(handle).to_bytes())
    assert active_blocks(consumer) == 3
    with pytest.raises(PullFailed, match=r"^KV pull of turn failed: "):
        source.read_layer(0, torch.empty(6, 4, 8), time.monotonic() + 5)
    assert active_blocks(consumer) == 0  # before close
    with pytest.raises(PullFailed, match=r"^KV of turn is closed$"):
        source.read_layer(1, torch.empty(6, 4, 8), time.monotonic() + 5)
    source.close()
    source.close()
    consumer.check_integrity()
    assert producer.discard("turn")
    producer.check_integrity()


def test_every_block_held_and_a_dead_producer_still_delivers(nodes: tuple[KVNode, KVNode]) -> None:
    producer, consumer = nodes
    local = hold(consumer, 20, seed=8)
    handle = producer.publish(export("turn", 20, seed=5), PROMPT).handle
    source = consumer.open(dead(handle).to_bytes())
    got = read_all(source, 5)  # telling the producer fails: logged, its lease expires
    assert all(torch.equal(g, e) for g, e in zip(got, local.layers, strict=True))
    assert active_blocks(consumer) == 0
    source.close()
    assert producer.discard("turn")
    consumer.check_integrity()


@pytest.mark.parametrize("after_layers", [0, 1])
def test_close_before_the_end_releases_both_leases(nodes: tuple[KVNode, KVNode], transport: list[TransferSpec],
                                                   after_layers: int) -> None:
    producer, consumer = nodes
    hold(consumer, 12, seed=7)
    handle = producer.publish(export("turn", 22, seed=1), PROMPT).handle
    source = consumer.open(handle.to_bytes())
    for layer in range(after_layers):
        source.read_layer(layer, torch.empty(6, 4, 8), time.monotonic() + 10)
    source.close()  # e.g. the request was aborted
    assert active_blocks(consumer) == 0
    with pytest.raises(PullFailed, match=r"^KV of turn is closed$"):
        source.read_layer(after_layers, torch.empty(6, 4, 8), time.monotonic() + 10)
    if after_layers:
        settle(producer)  # the pull's unpin named every slot of the handle
    else:
        assert producer.discard("turn")  # never pulled: the worker discards (or the lease expires)
    assert (len(producer.leases), active_blocks(producer)) == (0, 0)
    producer.check_integrity()
    consumer.check_integrity()


def test_a_handle_opened_twice_takes_two_leases(nodes: tuple[KVNode, KVNode]) -> None:
    producer, consumer = nodes
    hold(consumer, 12, seed=7)
    handle = producer.publish(export("turn", 22, seed=1), PROMPT).handle.to_bytes()
    first, second = consumer.open(handle), consumer.open(handle)
    assert active_blocks(consumer) == 3
    first.close()
    second.close()
    assert active_blocks(consumer) == 0
    consumer.check_integrity()
    producer.discard("turn")


def test_num_held_is_validated_where_it_is_set() -> None:
    with pytest.raises(ValueError, match=r"^num_held: expected 0, or 1\.\.1 for a pull by slots "):
        TransferSpec("", 1, 8, source_slots=(1, 2), source_gens=(1, 1), num_held=2)
    with pytest.raises(ValueError, match=r"^num_held: expected 0, or 1\.\.-1 for a pull by slots "):
        TransferSpec("t1", 1, 8, num_held=1)
    with pytest.raises(ValueError, match=r"^num_held: expected 0\.\.1 \(some slot must move\), got 2$"):
        PullRequest("", (1, 2), "", 1, 8, 1.0, True, (1, 1), 2)
    with pytest.raises(ValueError, match=r"^num_held: a published transfer moves all it publishes, got 1$"):
        PullRequest("t1", (), "", 1, 8, 1.0, True, (), 1)
    with pytest.raises(ValueError, match=r"^num_held: expected 0\.\.6, got 7$"):
        handle = KVHandle("r", tuple(bytes([i]) for i in range(5)), 22, "127.0.0.1:1", "n", "active", LAYOUT,
                          "shm", "", tuple(range(6)), (1,) * 6)
        PulledKVSource(handle, None, None, 1.0, num_held=7)  # type: ignore[arg-type]
