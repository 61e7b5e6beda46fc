"""The transport registry picks what pulls a KV handle: configured, or "auto" (optional
transports first where installed and able to pull by handle, then shm on one host, tcp across
hosts), saying why; KVNode takes its choice from KVNodeConfig.transport or KVBRIDGE_TRANSPORT
and refuses a transport that cannot serve, naming the field or the variable."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from kv_exports import random_export

from kvbridge import KVLayoutSpec, KVNode, KVNodeConfig
from kvbridge.errors import TransportUnavailable
from kvbridge.pull import PulledKVSource
from kvbridge.transport.registry import (
    TRANSPORT_ENV,
    TransportChoice,
    check_transport,
    choose_pull_transport,
    is_available,
)

LAYOUT = KVLayoutSpec("float32", 2, 4, 8, 32)
PROMPT = list(range(100, 108))
HAVE_NIXL, HAVE_DEEPEP = is_available("nixl"), is_available("deepep")
PASSED_OVER = "; ".join([
    "'nixl' is installed but cannot pull KV by handle yet (it moves published transfers only)" if HAVE_NIXL
    else "'nixl' needs the nixl package, which is not installed",
    "'deepep' is installed but cannot pull KV by handle yet (it moves published transfers only)" if HAVE_DEEPEP
    else "'deepep' needs the deep_ep package, which is not installed",
])


def test_auto_falls_back_to_shm_on_one_host_and_tcp_across_hosts_saying_why() -> None:
    assert choose_pull_transport("auto", True) == TransportChoice(
        "shm", f"shm: the producer's pool is on this host ({PASSED_OVER})")
    assert choose_pull_transport("auto", False) == TransportChoice(
        "tcp", f"tcp: the producer is on another host ({PASSED_OVER})")


def test_a_configured_transport_is_used_as_named_except_shm_across_hosts() -> None:
    assert choose_pull_transport("tcp", True) == TransportChoice("tcp", "tcp: configured")
    assert choose_pull_transport("shm", True) == TransportChoice("shm", "shm: configured")
    assert choose_pull_transport("shm", False) == TransportChoice(
        "tcp", "tcp: configured shm, but the producer is on another host")


def test_an_unknown_transport_names_the_field_and_the_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        check_transport("carrier-pigeon", "transport")
    assert str(info.value) == ("transport: expected 'auto' or one of ['deepep', 'nixl', 'shm', 'tcp'], "
                               "got 'carrier-pigeon'")


@pytest.mark.parametrize(("name", "package", "installed"), [("nixl", "nixl", HAVE_NIXL),
                                                            ("deepep", "deep_ep", HAVE_DEEPEP)])
def test_an_optional_transport_named_but_not_installed_names_its_package(name: str, package: str,
                                                                         installed: bool) -> None:
    if installed:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(TransportUnavailable) as info:
        choose_pull_transport(name, False)
    assert str(info.value) == f"transport: {name!r} needs the {package} package, which is not installed"


@pytest.mark.parametrize(("name", "installed"), [("nixl", HAVE_NIXL), ("deepep", HAVE_DEEPEP)])
def test_an_installed_optional_transport_named_says_it_cannot_pull_by_handle_yet(name: str,
                                                                                 installed: bool) -> None:
    if not installed:
        pytest.skip(f"transport {name!r}: its package is not installed here")
    with pytest.raises(ValueError) as info:
        check_transport(name, TRANSPORT_ENV)
    assert str(info.value) == (f"{TRANSPORT_ENV}: {name!r} is installed but cannot pull KV by handle yet "
                               "(it moves published transfers only); use 'auto', 'shm' or 'tcp'")


@pytest.fixture
def producer() -> Iterator[KVNode]:
    node = KVNode(KVNodeConfig("producer", "m", 8, 4), LAYOUT)
    yield node
    node.close()


def _pull(producer: KVNode, config: KVNodeConfig) -> tuple[str, list[torch.Tensor], list[torch.Tensor]]:
    """The transport a fresh consumer pulled a fresh handle over, what it got and what was sent."""
    exp = random_export(config.node_id, 8, 3, LAYOUT)
    handle = producer.publish(exp, PROMPT).handle
    consumer = KVNode(config, LAYOUT)
    try:
        source = consumer.open(handle.to_bytes())
        assert isinstance(source, PulledKVSource)
        got = []
        for layer in range(LAYOUT.num_layers):
            dst = torch.empty(2, LAYOUT.block_size, LAYOUT.kv_width)
            source.read_layer(layer, dst, time.monotonic() + 10)
            got.append(dst)
        return source.transport_name, got, list(exp.layers)
    finally:
        consumer.close()


def test_node_pulls_over_the_configured_transport(producer: KVNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    name, got, sent = _pull(producer, KVNodeConfig("auto", "m", 8, 4))
    assert name == "shm" and all(torch.equal(g, s) for g, s in zip(got, sent, strict=True))
    name, got, sent = _pull(producer, KVNodeConfig("named", "m", 8, 4, transport="tcp"))
    assert name == "tcp" and all(torch.equal(g, s) for g, s in zip(got, sent, strict=True))
    monkeypatch.setenv(TRANSPORT_ENV, "tcp")
    name, got, sent = _pull(producer, KVNodeConfig("env", "m", 8, 4))
    assert name == "tcp" and all(torch.equal(g, s) for g, s in zip(got, sent, strict=True))


def test_node_refuses_a_transport_that_cannot_serve_naming_field_or_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"^transport: expected 'auto' or one of .*, got 'udp'$"):
        KVNode(KVNodeConfig("n", "m", 4, 2, transport="udp"), LAYOUT)
    monkeypatch.setenv(TRANSPORT_ENV, "udp")
    with pytest.raises(ValueError, match=rf"^{TRANSPORT_ENV}: expected 'auto' or one of .*, got 'udp'$"):
        KVNode(KVNodeConfig("n", "m", 4, 2), LAYOUT)
    node = KVNode(KVNodeConfig("n", "m", 4, 2, transport="shm"), LAYOUT)  # the config wins over the variable
    assert node.transport == "shm"
    node.close()
