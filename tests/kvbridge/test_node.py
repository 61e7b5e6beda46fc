"""KVNode without an engine: publish an export, open its handle and pull it back byte for byte;
the cold tier (KVNodeConfig.cold_capacity_blocks) keeps evicted history and brings it back;
the config names bad fields; the transport registry opens the node's transports; SlotAllocator
reports unpins. The node with a real engine is tested in tests/serving/test_kv_*.py."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator

import pytest
import torch
from kv_exports import Export, random_export

from kvbridge import KVLayoutSpec, KVNode, KVNodeConfig, PullFailed
from kvbridge.handle import KVHandle
from kvbridge.slots import SlotAllocator
from kvbridge.transport.registry import TransportOptions, is_available, open_transport
from kvbridge.transport.shm import ShmTransport
from kvbridge.transport.tcp import TcpTransport

LAYOUT = KVLayoutSpec("float32", 2, 4, 8, 32)  # 2 layers, 4 tokens a block, 8 floats a token
P1 = list(range(100, 108))  # two full blocks each
P2 = list(range(200, 208))


def export(rid: str, num_tokens: int, seed: int) -> Export:
    return random_export(rid, num_tokens, seed, LAYOUT)


def pull_all(node: KVNode, handle: bytes) -> list[torch.Tensor]:
    source = node.open(handle)
    num_blocks = len(KVHandle.from_bytes(handle).block_slots)
    out = []
    for layer in range(LAYOUT.num_layers):
        dst = torch.empty(num_blocks, LAYOUT.block_size, LAYOUT.kv_width)
        source.read_layer(layer, dst, time.monotonic() + 10)
        out.append(dst)
    source.close()
    return out


@pytest.fixture
def node() -> Iterator[KVNode]:
    with_cold = KVNode(KVNodeConfig("cold-node", "m", 4, 2, cold_capacity_blocks=2), LAYOUT)
    yield with_cold
    with_cold.close()


def settle(node: KVNode) -> None:
    """Waits (bounded) until the block server reported every ended pull, then releases."""
    deadline = time.monotonic() + 5
    while len(node.leases) and time.monotonic() < deadline:
        node.maintain()
        time.sleep(0.01)


def test_publish_then_pull_returns_the_exported_bytes_and_frees_the_lease(node: KVNode) -> None:
    exp = export("a", 7, seed=1)  # one full block and a partial one
    published = node.publish(exp, P1)
    handle = published.handle
    assert (handle.num_tokens, len(handle.block_slots), len(handle.block_hashes)) == (7, 2, 1)
    assert published.num_bytes == 7 * 32 * 2
    pulled = pull_all(node, handle.to_bytes())
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(pulled[layer], exp.layers[layer])
    settle(node)
    assert len(node.leases) == 0
    assert node.import_counts == {"device": 0, "host": 1, "remote": 0}
    node.check_integrity()


def test_cold_tier_keeps_evicted_history_and_brings_it_back(node: KVNode) -> None:
    first = export("a", 8, seed=2)
    node.publish(first, P1)
    assert node.discard("a")  # P1's blocks: hot history
    node.publish(export("b", 8, seed=3), P2)
    assert node.discard("b")  # P2's blocks: hot history; hot holds 2, so P1's go cold
    chain = node.hashes(P1)
    assert node.store.lookup(chain).tiers == ("cold", "cold")
    assert node.resolve(chain) == []  # peers pull only hot blocks
    again = node.publish(export("c", 8, seed=99), P1)  # the store's copy wins over the new export
    pulled = pull_all(node, again.handle.to_bytes())
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(pulled[layer], first.layers[layer])
    settle(node)
    node.check_integrity()


class KVNodeHolder:
    def __init__(self, config: KVNodeConfig) -> None:
        self.node = KVNode(config, LAYOUT)

    def __enter__(self) -> KVNode:
        return self.node

    def __exit__(self, *exc: object) -> None:
        self.node.close()


def test_without_a_cold_tier_evicted_history_is_dropped() -> None:
    with KVNodeHolder(KVNodeConfig("no-cold", "m", 4, 2)) as node:
        node.publish(export("a", 8, seed=2), P1)
        node.discard("a")
        node.publish(export("b", 8, seed=3), P2)
        node.discard("b")
        assert node.store.lookup(node.hashes(P1)).num_blocks == 0
        assert node.store.lookup(node.hashes(P2)).tiers == ("hot", "hot")
        node.check_integrity()


def test_a_bad_handle_is_a_value_error_and_a_dead_source_a_pull_failure(node: KVNode) -> None:
    with pytest.raises(ValueError, match=r"^context_phase_params: data: undecodable KV handle"):
        node.open(b"\xc1garbage")
    handle = node.publish(export("a", 8, seed=4), P1).handle
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    dead = dataclasses.replace(handle, source_endpoint=f"127.0.0.1:{closed}", pool_name="")
    with KVNodeHolder(KVNodeConfig("consumer", "m", 4, 2)) as consumer:  # holds none of it: pulls all
        source = consumer.open(dead.to_bytes())
        with pytest.raises(PullFailed, match=r"^KV pull of a failed: "):
            source.read_layer(0, torch.empty(2, 4, 8), time.monotonic() + 5)
        source.close()
        consumer.check_integrity()
    node.discard("a")
    node.check_integrity()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("cold_capacity_blocks", -1, "cold_capacity_blocks: expected >= 0, got -1"),
    ("master_address", ("", 5), "master_address: expected (host, port), got ('', 5)"),
    ("lookup_timeout_s", 0.0, "lookup_timeout_s: expected > 0, got 0.0"),
])
def test_config_names_the_bad_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        KVNodeConfig("n", "m", 4, 2, **{field: value})  # type: ignore[arg-type]
    assert str(info.value) == message


def test_registry_opens_the_core_transports_and_refuses_what_needs_more() -> None:
    options = TransportOptions(timeout_s=1.0, connect_timeout_s=0.5)
    tcp, shm = open_transport("tcp", options), open_transport("shm", options)
    try:
        assert isinstance(tcp, TcpTransport) and isinstance(shm, ShmTransport)
        assert (tcp.timeout_s, shm.timeout_s) == (1.0, 1.0)
    finally:
        tcp.close()
        shm.close()
    assert is_available("shm") and is_available("tcp")
    with pytest.raises(ValueError, match=r"^name: transport 'deepep' cannot be opened from TransportOptions alone$"):
        open_transport("deepep", options)
    with pytest.raises(ValueError, match=r"^name: unknown transport 'carrier-pigeon'"):
        is_available("carrier-pigeon")


def test_slot_allocator_reports_unpins_not_frees() -> None:
    heard: list[tuple[int, ...]] = []
    slots = SlotAllocator(4, on_unpin=heard.append)
    got = slots.allocate(2)
    assert got == [0, 1]
    slots.pin(got)
    slots.unpin(got)
    assert heard == [(0, 1)] and slots.num_free == 2
    slots.free(got)
    assert heard == [(0, 1)] and slots.num_free == 4
    slots.check_integrity()
