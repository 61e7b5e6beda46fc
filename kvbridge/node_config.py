"""What a KVNode is configured with and what it hands back (see node.py).

``KVNodeConfig`` is the one dataclass a node is built from; ``KVExportLike`` is the shape of
the KV a producer publishes (the engine's KVExport fits; kvbridge imports nothing from the
engine); ``Published`` is a publish's result; ``ArrayPool`` holds a node's cold tier in process
memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from kvbridge.handle import KVHandle


@dataclass(frozen=True, slots=True)
class KVNodeConfig:
    """``model_id`` namespaces block hashes; ``pool_blocks`` sizes the shared-memory pool, of
    which ``hot_capacity_blocks`` may hold history (reusable prefixes no request holds);
    ``cold_capacity_blocks`` more history blocks live in process memory (0: none; peers pull
    only hot blocks). ``lease_s`` bounds how long published KV waits for its pull;
    ``pull_timeout_s`` bounds one pull on the consumer side; ``host`` is where the block server
    listens. ``master_address`` ((host, port); None: no cluster) names the kvbridge master,
    ``master_token`` its token; ``master_timeout_s`` bounds registration and index updates,
    ``lookup_timeout_s`` a prefix lookup, after whose failure lookups pause for
    ``lookup_cooldown_s``. ``transport`` names what pulls a handle's blocks ("auto", "shm",
    "tcp", "nixl", "deepep"; None: KVBRIDGE_TRANSPORT, else "auto"); KVNode checks it through
    the transport registry (registry.choose_pull_transport says what "auto" picks and why)."""

    node_id: str
    model_id: str
    pool_blocks: int
    hot_capacity_blocks: int
    lease_s: float = 60.0
    pull_timeout_s: float = 10.0
    host: str = "127.0.0.1"
    cold_capacity_blocks: int = 0
    master_address: tuple[str, int] | None = None
    master_token: str | None = None
    master_timeout_s: float = 2.0
    lookup_timeout_s: float = 0.05
    lookup_cooldown_s: float = 5.0
    transport: str | None = None

    def __post_init__(self) -> None:
        if self.pool_blocks < 1:
            raise ValueError(f"pool_blocks: expected >= 1, got {self.pool_blocks}")
        if not 0 <= self.hot_capacity_blocks <= self.pool_blocks:
            raise ValueError(f"hot_capacity_blocks: expected 0..{self.pool_blocks}, got {self.hot_capacity_blocks}")
        if self.cold_capacity_blocks < 0:
            raise ValueError(f"cold_capacity_blocks: expected >= 0, got {self.cold_capacity_blocks}")
        if self.lease_s <= 0 or self.pull_timeout_s <= 0:
            raise ValueError(f"lease_s/pull_timeout_s: expected > 0, got {self.lease_s}/{self.pull_timeout_s}")
        for name in ("master_timeout_s", "lookup_timeout_s", "lookup_cooldown_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if self.master_address is not None:
            host, port = self.master_address
            if not host or not 0 < port < 65536:
                raise ValueError(f"master_address: expected (host, port), got {self.master_address!r}")


class KVExportLike(Protocol):
    """The KV of a finished prefill: the first ``num_tokens`` tokens in ``block_ids`` (the last
    block may be partly filled); ``layer(i)`` is a tensor copy ``[len(block_ids), block_size,
    kv_width]`` of layer i; ``layout`` has KVLayoutSpec.of's fields."""

    @property
    def request_id(self) -> str: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def layout(self) -> Any: ...
    @property
    def block_ids(self) -> Sequence[int]: ...

    def layer(self, index: int) -> Any: ...


@dataclass(frozen=True, slots=True)
class Published:
    """A publish's result: the handle and the KV bytes it makes available."""

    handle: KVHandle
    num_bytes: int
    elapsed_ns: int


class ArrayPool:
    """A block pool in process memory, per layer ``[num_slots, block_bytes]`` uint8 (a node's
    cold tier: nothing outside the process maps it)."""

    def __init__(self, num_layers: int, num_slots: int, block_bytes: int) -> None:
        self.array = np.zeros((num_layers, num_slots, block_bytes), dtype=np.uint8)

    def layer(self, layer: int) -> np.ndarray:
        return self.array[layer]
