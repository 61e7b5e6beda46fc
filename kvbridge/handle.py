"""The KV handle: what a prefill returns and a decode consumes (``context_phase_params``).

Wire form: msgpack map ``{"v": version, ...}`` of plain types (no pickle). ``from_bytes``
validates every field (types, ranges, and the cross-field rules below) and raises ValueError
naming the field and value; ``check_layout`` raises LayoutMismatch naming the differing field.

Cross-field rules a consumer may rely on:
- ``len(block_slots) == ceil(num_tokens / layout.block_size)`` (the source's pool slots, one per
  block, partial last block included), and ``len(block_hashes) == num_tokens // block_size``
  (only full blocks are hashed);
- ``len(block_gens) == len(block_slots)``: each slot's generation in the source's SlotAllocator
  when the handle was built; the source pins by (slot, generation), so a handle whose slots were
  freed and handed out again fails its pull as stale instead of reading another request's KV;
- ``layout.bytes_per_token_per_layer == layout.kv_width * itemsize(layout.dtype)``.
``device_ref`` (optional, opaque here) lets a consumer on the same GPU read the blocks straight
from the producer's device cache (kvbridge.transport.cuda_ipc.DeviceRef); the pool slots stay
the fallback. Never imports torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from kvbridge.errors import LayoutMismatch

HANDLE_VERSION = 3  # 2: block_gens; 3: device_ref
MAX_DEVICE_REF_BYTES = 1024 * 1024
MAX_HANDLE_BYTES = 4 * 1024 * 1024
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int8": 1, "uint8": 1,
}


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r:.80}")
    return value


def _check_str(name: str, value: object, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > 1024:
        raise ValueError(f"{name}: expected a non-empty str (<= 1024 chars), got {value!r:.80}")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class KVLayoutSpec:
    """Layout of one KV cache: one tensor per layer, [num_blocks, block_size, kv_width] of dtype."""

    dtype: str
    num_layers: int
    block_size: int
    kv_width: int
    bytes_per_token_per_layer: int

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"layout.dtype: unknown dtype {self.dtype!r} (known: {sorted(DTYPE_ITEMSIZE)})")
        for name in ("num_layers", "block_size", "kv_width", "bytes_per_token_per_layer"):
            _check_int(f"layout.{name}", getattr(self, name), 1)
        expected = self.kv_width * DTYPE_ITEMSIZE[self.dtype]
        if self.bytes_per_token_per_layer != expected:
            raise ValueError(
                f"layout.bytes_per_token_per_layer: {self.bytes_per_token_per_layer} != "
                f"kv_width {self.kv_width} * itemsize({self.dtype}) = {expected}"
            )

    @classmethod
    def of(cls, layout: object) -> KVLayoutSpec:
        """Copies any object with the same five attributes (e.g. the engine's KVLayout)."""
        return cls(**{f.name: getattr(layout, f.name) for f in dataclasses.fields(cls)})

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer."""
        return self.block_size * self.bytes_per_token_per_layer


@dataclasses.dataclass(frozen=True, slots=True)
class KVHandle:
    """Where a request's KV lives and how it is laid out. Immutable; safe to share."""

    request_id: str
    block_hashes: tuple[bytes, ...]
    num_tokens: int
    source_endpoint: str   # "host:port" of the source node's block server
    source_node: str
    tier: str
    layout: KVLayoutSpec
    transport: str
    pool_name: str         # the source's shared-memory pool ('' when not shareable)
    block_slots: tuple[int, ...]
    block_gens: tuple[int, ...]  # generation of each block_slots entry (SlotAllocator.generations)
    device_ref: bytes = b""       # the same blocks in the producer's GPU cache ('' when none)
    version: int = HANDLE_VERSION

    def __post_init__(self) -> None:
        if self.version != HANDLE_VERSION:
            raise ValueError(f"version: unsupported KV handle version {self.version!r} (expected {HANDLE_VERSION})")
        _check_str("request_id", self.request_id)
        _check_str("source_node", self.source_node)
        _check_str("tier", self.tier)
        _check_str("transport", self.transport)
        _check_str("pool_name", self.pool_name, allow_empty=True)
        _check_endpoint(self.source_endpoint)
        _check_int("num_tokens", self.num_tokens, 1)
        if not isinstance(self.device_ref, bytes) or len(self.device_ref) > MAX_DEVICE_REF_BYTES:
            raise ValueError(f"device_ref: expected <= {MAX_DEVICE_REF_BYTES} bytes, got {self.device_ref!r:.80}")
        if not isinstance(self.layout, KVLayoutSpec):
            raise ValueError(f"layout: expected KVLayoutSpec, got {type(self.layout).__name__}")
        self._check_blocks()

    def _check_blocks(self) -> None:
        block_size = self.layout.block_size
        num_blocks = -(-self.num_tokens // block_size)
        if not isinstance(self.block_slots, tuple) or len(self.block_slots) != num_blocks:
            raise ValueError(
                f"block_slots: expected {num_blocks} slots for num_tokens={self.num_tokens} "
                f"(block_size {block_size}), got {self.block_slots!r:.80}"
            )
        for i, slot in enumerate(self.block_slots):
            _check_int(f"block_slots[{i}]", slot, 0)
        if not isinstance(self.block_gens, tuple) or len(self.block_gens) != num_blocks:
            raise ValueError(
                f"block_gens: expected {num_blocks} generations (one per block slot), got {self.block_gens!r:.80}"
            )
        for i, gen in enumerate(self.block_gens):
            _check_int(f"block_gens[{i}]", gen, 0)
        num_full = self.num_tokens // block_size
        if not isinstance(self.block_hashes, tuple) or len(self.block_hashes) != num_full:
            raise ValueError(
                f"block_hashes: expected {num_full} hashes (full blocks of num_tokens={self.num_tokens}), "
                f"got {len(self.block_hashes) if isinstance(self.block_hashes, tuple) else self.block_hashes!r}"
            )
        for i, digest in enumerate(self.block_hashes):
            if not isinstance(digest, bytes) or not 1 <= len(digest) <= 64:
                raise ValueError(f"block_hashes[{i}]: expected 1..64 bytes, got {digest!r:.80}")

    @property
    def source_host_port(self) -> tuple[str, int]:
        host, _, port = self.source_endpoint.rpartition(":")
        return host, int(port)

    def check_layout(self, expected: KVLayoutSpec) -> None:
        """Raises LayoutMismatch naming the first field where this handle differs from ``expected``."""
        for field in dataclasses.fields(KVLayoutSpec):
            got, want = getattr(self.layout, field.name), getattr(expected, field.name)
            if got != want:
                raise LayoutMismatch(f"layout.{field.name}", got, want)

    def to_bytes(self) -> bytes:
        wire: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        wire["block_hashes"] = list(self.block_hashes)
        wire["block_slots"] = list(self.block_slots)
        wire["block_gens"] = list(self.block_gens)
        wire["layout"] = dataclasses.asdict(self.layout)
        return bytes(msgpack.packb(wire, use_bin_type=True))

    @classmethod
    def from_bytes(cls, data: bytes) -> KVHandle:
        """Decodes and validates; ValueError naming the field on anything unexpected."""
        if len(data) > MAX_HANDLE_BYTES:
            raise ValueError(f"data: KV handle of {len(data)} bytes exceeds {MAX_HANDLE_BYTES}")
        try:
            wire = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ValueError(f"data: undecodable KV handle ({exc})") from exc
        if not isinstance(wire, dict):
            raise ValueError(f"data: expected a msgpack map, got {type(wire).__name__}")
        version = wire.get("version")
        if version != HANDLE_VERSION:
            raise ValueError(f"version: unsupported KV handle version {version!r} (expected {HANDLE_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(wire) != names:
            raise ValueError(f"fields: expected {sorted(names)}, got {sorted(map(str, wire))}")
        layout = wire["layout"]
        layout_names = {f.name for f in dataclasses.fields(KVLayoutSpec)}
        if not isinstance(layout, dict) or set(layout) != layout_names:
            raise ValueError(f"layout: expected a map with {sorted(layout_names)}, got {layout!r:.120}")
        for key in ("block_hashes", "block_slots", "block_gens"):
            if not isinstance(wire[key], list):
                raise ValueError(f"{key}: expected a list, got {type(wire[key]).__name__}")
        wire["layout"] = KVLayoutSpec(**layout)
        wire["block_hashes"] = tuple(wire["block_hashes"])
        wire["block_slots"] = tuple(wire["block_slots"])
        wire["block_gens"] = tuple(wire["block_gens"])
        return cls(**wire)


def _check_endpoint(endpoint: object) -> None:
    text = _check_str("source_endpoint", endpoint)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"source_endpoint: expected 'host:port', got {text!r}")
