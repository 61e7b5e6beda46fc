"""``StoreKVHooks``: the engine's KVHooks protocol over a BlockStore and host block pools.

The engine's protocols (backends/engine/hooks.py) are duck-typed here; kvbridge imports
nothing from backends. Block data lives in host pools laid out per layer as
``[num_slots, block_bytes]`` uint8 (kvbridge.pool.HostBlockPool fits): one block of one layer
is ``block_size * bytes_per_token_per_layer`` raw bytes, whatever the dtype.

- ``lookup_prefix``: hashes the full blocks and asks the store (no state change).
- ``load_prefix``: pins the matched blocks (``acquire``) and writes their KV into the
  engine's blocks layer by layer.
- ``blocks_computed``: copies newly full blocks out of the engine's cache into fresh pool
  slots, then publishes them (a block is published only after its KV is written). A chain's
  first report (e.g. an import's blocks) pins the prefix the store already holds instead of
  copying it again. From a CUDA cache the copy runs off the step path: the blocks are
  gathered on the engine's stream (device to device), copied to pinned host memory on a side
  stream, and published by a later hook call once that copy's event has completed (in
  submission order); ``request_finished`` and ``flush`` wait for a request's copies.
- ``request_finished``: releases the request's blocks to the history tier.

``LockedHooks`` wraps any such hooks so each call runs under a lock the caller shares (a node's
block-server threads resolve chains against the same store while the engine thread uses it).

Not thread-safe: the engine calls hooks from its step thread only.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from kvbridge.hashing import BlockHash, hash_blocks
from kvbridge.store import BlockStore
from kvbridge.tiers import PoolName


class LayerPool(Protocol):
    """A block pool seen per layer: ``layer(i)`` is a writable ``[num_slots, block_bytes]``
    uint8 view."""

    def layer(self, layer: int) -> np.ndarray: ...


class CacheAccess(Protocol):
    """The engine's KVCacheAccess, duck-typed (layout: dtype, num_layers, block_size,
    kv_width, bytes_per_token_per_layer)."""

    layout: Any

    def read_blocks(self, layer: int, block_ids: Sequence[int]) -> torch.Tensor: ...
    def write_blocks(self, layer: int, block_ids: Sequence[int], data: torch.Tensor) -> None: ...


class PoolMover:
    """``BlockMover`` copying every layer between a hot and a cold host pool."""

    def __init__(self, num_layers: int, hot: LayerPool, cold: LayerPool | None = None) -> None:
        self.num_layers = num_layers
        self._pools: dict[PoolName, LayerPool | None] = {"hot": hot, "cold": cold}

    def copy(
        self, src: PoolName, src_slots: Sequence[int], dst: PoolName, dst_slots: Sequence[int]
    ) -> None:
        src_pool, dst_pool = self._pools[src], self._pools[dst]
        if src_pool is None or dst_pool is None:
            raise RuntimeError(f"copy from {src} to {dst}: pool not configured")
        for layer in range(self.num_layers):
            dst_pool.layer(layer)[list(dst_slots)] = src_pool.layer(layer)[list(src_slots)]


@dataclass(slots=True)
class _Export:
    """Blocks of one report on their way to host memory: ``host`` [layers, blocks, bytes]
    (pinned), complete once ``done`` (an event; None: already complete) has."""

    request_id: str
    hashes: list[BlockHash]
    slots: list[int]
    host: torch.Tensor
    done: Any


class StoreKVHooks:
    """Implements the engine's ``KVHooks`` over ``store`` whose hot pool is ``hot_pool``.

    ``deferred``: copy and publish off the step path (see the module doc); None picks it for
    CUDA caches. On a CPU cache it copies at once and publishes at the next hook call (tests).
    """

    def __init__(
        self,
        store: BlockStore,
        hot_pool: LayerPool,
        block_size: int,
        extra_key: bytes | str = b"",
        deferred: bool | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.store = store
        self.hot_pool = hot_pool
        self.block_size = block_size
        self.extra_key = extra_key
        self.deferred = deferred
        self._chains: dict[str, list[BlockHash]] = {}
        self._exports: list[_Export] = []  # in submission (= completion) order
        self._side_stream: Any = None

    # ---- KVHooks ----
    def lookup_prefix(self, request_id: str, token_ids: Sequence[int]) -> int:
        self._publish_done()
        max_blocks = max(len(token_ids) - 1, 0) // self.block_size
        hashes = hash_blocks(
            token_ids[: max_blocks * self.block_size], self.block_size, self.extra_key
        )
        return self.store.lookup(hashes).num_blocks * self.block_size

    def load_prefix(
        self,
        request_id: str,
        token_ids: Sequence[int],
        block_ids: Sequence[int],
        cache: CacheAccess,
    ) -> int:
        self._publish_done()
        num_blocks = min(len(block_ids), len(token_ids) // self.block_size)
        hashes = self._chain(request_id, token_ids[: num_blocks * self.block_size])
        # A preempted request is re-admitted without request_finished: its published blocks
        # (its copies in flight first) go back to history, then the match (usually those very
        # blocks) is pinned.
        self.flush(request_id)
        self.store.release(request_id)
        slots = self.store.acquire(request_id, hashes[:num_blocks])
        if not slots:
            return 0
        self._check_layout(cache)
        dtype = getattr(torch, cache.layout.dtype)
        shape = (len(slots), self.block_size, cache.layout.kv_width)
        for layer in range(cache.layout.num_layers):
            raw = torch.from_numpy(self.hot_pool.layer(layer)[slots])
            cache.write_blocks(layer, block_ids[: len(slots)], raw.view(dtype).reshape(shape))
        return len(slots) * self.block_size

    def blocks_computed(
        self,
        request_id: str,
        token_ids: Sequence[int],
        block_ids: Sequence[int],
        cache: CacheAccess,
    ) -> None:
        self._publish_done()
        hashes = self._chain(request_id, token_ids)
        start = len(hashes) - len(block_ids)
        in_flight = sum(len(e.hashes) for e in self._exports if e.request_id == request_id)
        held = self.store.held_blocks(request_id) + in_flight
        if held == 0 and start == 0:
            held = self._adopt_stored(request_id, hashes)
        if held < start or held >= len(hashes):
            return  # a gap (the chain must stay contiguous) or nothing new
        new_hashes, new_ids = hashes[held:], list(block_ids[held - start :])
        slots = self.store.allocate_slots(len(new_hashes))
        if slots is None:
            return  # no room: these blocks simply are not cached
        try:
            self._check_layout(cache)
            layers = [cache.read_blocks(layer, new_ids) for layer in range(cache.layout.num_layers)]
            deferred = self.deferred if self.deferred is not None else layers[0].is_cuda
            if deferred:
                self._exports.append(_Export(request_id, new_hashes, slots,
                                             *self._to_host(layers)))
                return
            for layer, data in enumerate(layers):
                raw = data.contiguous().cpu().view(torch.uint8).reshape(len(new_ids), -1)
                self.hot_pool.layer(layer)[slots] = raw.numpy()
        except BaseException:
            self.store.abandon_slots(slots)
            raise
        self.store.publish(request_id, new_hashes, slots)

    def request_finished(self, request_id: str) -> None:
        self.flush(request_id)
        self._chains.pop(request_id, None)
        self.store.release(request_id)

    def flush(self, request_id: str | None = None) -> None:
        """Wait for the copies of `request_id` (every request: None) and publish them, with
        every earlier one."""
        last = max((i for i, e in enumerate(self._exports)
                    if request_id is None or e.request_id == request_id), default=-1)
        for export in self._exports[: last + 1]:
            if export.done is not None:
                export.done.synchronize()
        self._publish_done()

    @property
    def num_exports_in_flight(self) -> int:
        return len(self._exports)

    # ---- helpers ----
    def _to_host(self, layers: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Start copying the gathered blocks (one tensor per layer, already copies) to host
        memory; (host tensor, completion event or None)."""
        rows = [t.view(torch.uint8).reshape(t.shape[0], -1) for t in layers]
        if not rows[0].is_cuda:
            return torch.stack([r.contiguous() for r in rows]), None
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(rows[0].device)
        host = torch.empty((len(rows), *rows[0].shape), dtype=torch.uint8, pin_memory=True)
        gathered = torch.cuda.Event()
        gathered.record()  # the engine's stream: the gathers above are enqueued
        side = self._side_stream
        with torch.cuda.stream(side):
            side.wait_event(gathered)
            for i, row in enumerate(rows):
                host[i].copy_(row, non_blocking=True)
                row.record_stream(side)  # its memory stays ours until the copy is done
            done = torch.cuda.Event()
            done.record(side)
        return host, done

    def _publish_done(self) -> None:
        """Publish the finished copies at the head of the queue (they finish in order)."""
        while self._exports and (self._exports[0].done is None or self._exports[0].done.query()):
            export = self._exports.pop(0)
            for layer in range(export.host.shape[0]):
                self.hot_pool.layer(layer)[export.slots] = export.host[layer].numpy()
            self.store.publish(export.request_id, export.hashes, export.slots)

    def _adopt_stored(self, request_id: str, hashes: list[BlockHash]) -> int:
        """Pins the prefix of a chain's first report that the store already holds (e.g.
        imported KV this node published before), so only the rest is copied; returns its
        length in blocks."""
        if self.store.lookup(hashes).num_blocks == 0:
            return 0
        self.store.release(request_id)  # a registration with nothing pinned
        return len(self.store.acquire(request_id, hashes))

    def _chain(self, request_id: str, token_ids: Sequence[int]) -> list[BlockHash]:
        """Hashes of the full blocks of token_ids, extending this request's cached chain."""
        chain = self._chains.setdefault(request_id, [])
        num_blocks = len(token_ids) // self.block_size
        if len(chain) > num_blocks:
            return chain[:num_blocks]
        done = len(chain) * self.block_size
        parent = chain[-1] if chain else None
        tail = token_ids[done : num_blocks * self.block_size]
        chain.extend(hash_blocks(tail, self.block_size, self.extra_key, parent_hash=parent))
        return chain

    def _check_layout(self, cache: CacheAccess) -> None:
        layout = cache.layout
        if layout.block_size != self.block_size:
            raise ValueError(
                f"cache.layout.block_size {layout.block_size} != hooks block_size {self.block_size}"
            )
        block_bytes = self.hot_pool.layer(0).shape[1]
        expected = layout.block_size * layout.bytes_per_token_per_layer
        if block_bytes != expected:
            raise ValueError(f"pool block_bytes {block_bytes} != cache block bytes {expected}")


class LockedHooks:
    """The engine's KVHooks over ``hooks`` (e.g. a StoreKVHooks), each call under ``lock``."""

    def __init__(self, hooks: Any, lock: threading.RLock) -> None:
        self.inner = hooks
        self._lock = lock

    def lookup_prefix(self, request_id: str, token_ids: Sequence[int]) -> int:
        with self._lock:
            return int(self.inner.lookup_prefix(request_id, token_ids))

    def load_prefix(self, request_id: str, token_ids: Sequence[int], block_ids: list[int], cache: Any) -> int:
        with self._lock:
            return int(self.inner.load_prefix(request_id, token_ids, block_ids, cache))

    def blocks_computed(self, request_id: str, token_ids: Sequence[int], block_ids: Sequence[int],
                        cache: Any) -> None:
        with self._lock:
            self.inner.blocks_computed(request_id, token_ids, block_ids, cache)

    def request_finished(self, request_id: str) -> None:
        with self._lock:
            self.inner.request_finished(request_id)

    def flush(self, request_id: str | None = None) -> None:
        with self._lock:
            self.inner.flush(request_id)

    @property
    def num_exports_in_flight(self) -> int:
        return int(self.inner.num_exports_in_flight)
