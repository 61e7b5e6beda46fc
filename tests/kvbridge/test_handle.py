"""KVHandle: wire round trip, validation of every field, layout mismatch errors."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from kvbridge.errors import LayoutMismatch
from kvbridge.handle import KVHandle, KVLayoutSpec

LAYOUT = KVLayoutSpec(dtype="float16", num_layers=2, block_size=4, kv_width=8, bytes_per_token_per_layer=16)


def make_handle(**changes: object) -> KVHandle:
    fields: dict[str, object] = dict(
        request_id="req-1", block_hashes=(b"\x01" * 16, b"\x02" * 16), num_tokens=10,
        source_endpoint="10.0.0.2:7000", source_node="prefill-0", tier="active", layout=LAYOUT,
        transport="tcp", pool_name="kvb-pool-x", block_slots=(5, 6, 9),
        block_gens=(3, 1, 7),
    )
    fields.update(changes)
    return KVHandle(**fields)  # type: ignore[arg-type]


def test_roundtrip() -> None:
    handle = make_handle()
    back = KVHandle.from_bytes(handle.to_bytes())
    assert back == handle
    assert (back.version, back.block_slots, back.block_gens) == (3, (5, 6, 9), (3, 1, 7))
    assert back.device_ref == b""
    with_ref = dataclasses.replace(handle, device_ref=b"\x81\x01\x02")
    assert KVHandle.from_bytes(with_ref.to_bytes()).device_ref == b"\x81\x01\x02"
    wire = msgpack.unpackb(handle.to_bytes(), raw=False)
    assert (wire["block_slots"], wire["block_gens"]) == ([5, 6, 9], [3, 1, 7])
    assert back.source_host_port == ("10.0.0.2", 7000)
    assert LAYOUT.block_bytes == 64


def test_layout_mismatch_names_field_and_values() -> None:
    handle = make_handle()
    handle.check_layout(LAYOUT)
    other = dataclasses.replace(LAYOUT, block_size=16)
    with pytest.raises(LayoutMismatch, match=r"layout.block_size: handle has 4, expected 16"):
        handle.check_layout(other)
    with pytest.raises(ValueError, match=r"layout.dtype: handle has 'float16', expected 'float32'"):
        handle.check_layout(KVLayoutSpec("float32", 2, 4, 8, 32))


def test_layout_validation() -> None:
    with pytest.raises(ValueError, match=r"bytes_per_token_per_layer: 8 != kv_width 8 \* itemsize\(float16\) = 16"):
        KVLayoutSpec("float16", 2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"layout.dtype: unknown dtype 'complex64'"):
        KVLayoutSpec("complex64", 2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"layout.num_layers: expected an int >= 1, got 0"):
        KVLayoutSpec("float16", 0, 4, 8, 16)


def test_block_count_validation() -> None:
    with pytest.raises(ValueError, match=r"block_slots: expected 3 slots for num_tokens=10 \(block_size 4\)"):
        make_handle(block_slots=(1, 2))
    with pytest.raises(ValueError, match=r"block_hashes: expected 2 hashes .* got 1"):
        make_handle(block_hashes=(b"\x01",))
    with pytest.raises(ValueError, match=r"block_slots\[1\]: expected an int >= 0, got -1"):
        make_handle(block_slots=(1, -1, 2))
    with pytest.raises(ValueError, match=r"source_endpoint: expected 'host:port', got 'nohost'"):
        make_handle(source_endpoint="nohost")


def test_block_gens_validation() -> None:
    with pytest.raises(ValueError, match=r"^block_gens: expected 3 generations \(one per block slot\), got \(1, 2\)$"):
        make_handle(block_gens=(1, 2))
    with pytest.raises(ValueError, match=r"^block_gens: expected 3 generations \(one per block slot\), got \[1, 2, 3\]$"):
        make_handle(block_gens=[1, 2, 3])
    with pytest.raises(ValueError, match=r"^block_gens\[2\]: expected an int >= 0, got -1$"):
        make_handle(block_gens=(1, 2, -1))
    with pytest.raises(ValueError, match=r"^block_gens\[0\]: expected an int >= 0, got True$"):
        make_handle(block_gens=(True, 2, 3))
    with pytest.raises(ValueError, match=r"^block_gens: expected a list, got int$"):
        KVHandle.from_bytes(_wire(block_gens=3))
    with pytest.raises(ValueError, match=r"^block_gens\[1\]: expected an int >= 0, got 'x'$"):
        KVHandle.from_bytes(_wire(block_gens=[1, "x", 3]))


def _wire(**changes: object) -> bytes:
    wire = msgpack.unpackb(make_handle().to_bytes(), raw=False)
    wire.update(changes)
    return msgpack.packb(wire, use_bin_type=True)


def test_from_bytes_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"version: unsupported KV handle version 4 \(expected 3\)"):
        KVHandle.from_bytes(_wire(version=4))
    v1 = msgpack.unpackb(make_handle().to_bytes(), raw=False)
    del v1["block_gens"]
    v1["version"] = 1
    with pytest.raises(ValueError, match=r"^version: unsupported KV handle version 1 \(expected 3\)$"):
        KVHandle.from_bytes(msgpack.packb(v1, use_bin_type=True))
    with pytest.raises(ValueError, match=r"device_ref: expected <= 1048576 bytes, got 'x'"):
        KVHandle.from_bytes(_wire(device_ref="x"))
    with pytest.raises(ValueError, match=r"num_tokens: expected an int >= 1, got '10'"):
        KVHandle.from_bytes(_wire(num_tokens="10"))
    with pytest.raises(ValueError, match=r"fields: expected \["):
        KVHandle.from_bytes(_wire(extra=1))
    with pytest.raises(ValueError, match="data: undecodable KV handle"):
        KVHandle.from_bytes(b"\xc1")
    with pytest.raises(ValueError, match="data: expected a msgpack map, got list"):
        KVHandle.from_bytes(msgpack.packb([1]))
    with pytest.raises(ValueError, match=r"block_hashes\[0\]: expected 1..64 bytes, got 'a'"):
        KVHandle.from_bytes(_wire(block_hashes=["a", "b"]))
    with pytest.raises(ValueError, match="layout: expected a map with"):
        KVHandle.from_bytes(_wire(layout=[1]))
