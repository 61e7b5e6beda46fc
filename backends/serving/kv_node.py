"""A worker's kvbridge node: shared-memory block pool, block server, tiered store, leases.

One per pd_worker (one engine). It owns:
- a HostBlockPool in /dev/shm ([num_layers][pool_blocks][block_bytes]) and its SlotAllocator;
- a TcpTransport whose BlockServer (127.0.0.1, a free port) serves the pool: peers pull slots
  over tcp, or pin them and map the pool (shm);
- a BlockStore over the pool (active + hot history tier, LRU) and StoreKVHooks over it, which
  the engine uses to reuse prefix blocks locally;
- the leases that keep published prefill KV pinned until its consumer pulled it.

``publish`` (prefill side) copies an export's blocks into the pool (only the blocks the store
does not already hold, layer by layer), indexes its full blocks under a lease and returns the
KVHandle. ``source`` (decode side) validates a handle and returns a PulledKVSource.
On a CUDA engine, ``attach_device`` shares the engine's cache (CUDA IPC) and keeps its block
generations in /dev/shm: handles then also carry a DeviceRef, and a consumer engine on the same
GPU reads the blocks device to device (DeviceKVSource), the pool copy being its fallback.
Threads: every method except ``close`` runs on the engine thread (the store and the hooks are
not thread-safe); block-server threads only report ended pulls to the lease table.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from backends.engine.outputs import KVExport
from backends.serving.kv_leases import Lease, LeaseId, LeaseTable
from backends.serving.kv_remote import LockedHooks, PrefixSource
from backends.serving.kv_source import DeviceKVSource, PulledKVSource, open_handle
from kvbridge.handle import KVHandle, KVLayoutSpec
from kvbridge.hashing import BlockHash, hash_blocks
from kvbridge.hooks import StoreKVHooks
from kvbridge.master.messages import NodeMatch
from kvbridge.pool import HostBlockPool, PoolLayout
from kvbridge.slots import SlotAllocator
from kvbridge.store import BlockStore
from kvbridge.tiers import StoreConfig, TierEvent
from kvbridge.transport import cuda_ipc
from kvbridge.transport.shm import ShmTransport
from kvbridge.transport.tcp import TcpTransport

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVNodeConfig:
    """``model_id`` namespaces block hashes; ``lease_s`` bounds how long published KV waits
    for its pull; ``pull_timeout_s`` bounds one pull on the decode side."""

    node_id: str
    model_id: str
    pool_blocks: int
    hot_capacity_blocks: int
    lease_s: float = 60.0
    pull_timeout_s: float = 10.0
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.pool_blocks < 1:
            raise ValueError(f"pool_blocks: expected >= 1, got {self.pool_blocks}")
        if not 0 <= self.hot_capacity_blocks <= self.pool_blocks:
            raise ValueError(f"hot_capacity_blocks: expected 0..{self.pool_blocks}, got {self.hot_capacity_blocks}")
        if self.lease_s <= 0 or self.pull_timeout_s <= 0:
            raise ValueError(f"lease_s/pull_timeout_s: expected > 0, got {self.lease_s}/{self.pull_timeout_s}")


@dataclass(frozen=True, slots=True)
class Published:
    """A publish's result: the handle and the KV bytes it makes available."""

    handle: KVHandle
    num_bytes: int
    elapsed_ns: int


class NotifyingSlotAllocator(SlotAllocator):
    """A SlotAllocator that reports every ``unpin`` (the block server's end of a pull or pin)."""

    def __init__(self, num_slots: int, on_unpin: Callable[[tuple[int, ...]], None]) -> None:
        super().__init__(num_slots)
        self._on_unpin = on_unpin

    def unpin(self, ids: Iterable[int]) -> None:  # type: ignore[override]
        slots = tuple(ids)
        self.free(slots)
        self._on_unpin(slots)


def pool_name(pgid: int, pid: int) -> str:
    """A fresh pool name tagged with the server's process group and the stub's pid: a worker
    stub runs in tritonserver's group, so the launcher can unlink what a killed stub left
    behind (shm_cleanup.py), all of the group's at the end or one dead stub's at once."""
    return f"kvb-pool-g{pgid}-p{pid}-{secrets.token_hex(6)}"


class KVNode:
    """See the module docstring. ``close()`` stops the server and unlinks the pool."""

    def __init__(self, config: KVNodeConfig, layout: KVLayoutSpec,
                 listener: Callable[[TierEvent], None] | None = None) -> None:
        self.config = config
        self.layout = layout
        self.leases = LeaseTable()
        self.pool = HostBlockPool.create(PoolLayout(layout.num_layers, config.pool_blocks, layout.block_bytes),
                                         name=pool_name(os.getpgrp(), os.getpid()))
        self.allocator = NotifyingSlotAllocator(config.pool_blocks, self.leases.pulled)
        connect_s = min(config.pull_timeout_s, 5.0)
        self.tcp = TcpTransport(config.host, 0, timeout_s=config.pull_timeout_s, connect_timeout_s=connect_s)
        self.shm = ShmTransport(timeout_s=config.pull_timeout_s, connect_timeout_s=connect_s)
        self._lock = threading.RLock()  # the store: the engine thread, and resolves from peers
        self.tcp.serve_pool(self.pool, self.allocator, self.resolve)
        self.store = BlockStore(
            StoreConfig(config.hot_capacity_blocks, 0, layout.num_layers * layout.block_bytes),
            self.allocator, listener=listener)
        self.hooks = LockedHooks(StoreKVHooks(self.store, self.pool, layout.block_size,
                                              extra_key=config.model_id), self._lock)
        self._device: _DeviceShare | None = None
        self.import_counts = {"device": 0, "host": 0, "remote": 0}  # KV imports completed, by path
        self._counts_lock = threading.Lock()

    def attach_device(self, block_manager: Any, kv_caches: list[torch.Tensor]) -> None:
        """Shares a CUDA engine's cache and block generations (see the module docstring)."""
        device = kv_caches[0].device
        table = cuda_ipc.GenerationTable(cuda_ipc.table_name(os.getpgrp(), os.getpid()),
                                         block_manager.num_total_blocks, create=True)
        try:
            block_manager.use_generations(table.array)
            self._device = _DeviceShare(device, cuda_ipc.device_uuid(device), table,
                                        cuda_ipc.share_layers(kv_caches))
        except BaseException:
            table.close()
            raise

    @property
    def endpoint(self) -> str:
        return self.tcp.endpoint

    def hashes(self, token_ids: Sequence[int]) -> list[BlockHash]:
        return hash_blocks(token_ids, self.layout.block_size, self.config.model_id)

    def resolve(self, hashes: Sequence[bytes]) -> list[int]:
        """Pool slots of the longest prefix of chain ``hashes`` this node holds in its hot pool
        (the block server's threads ask, for peers reusing our prefixes)."""
        with self._lock:
            match = self.store.lookup([BlockHash(h) for h in hashes])
        slots = []
        for tier, slot in zip(match.tiers, match.slots, strict=True):
            if tier == "cold":
                break
            slots.append(slot)
        return slots

    def prefix_source(self, request_id: str, prompt_ids: Sequence[int], remote: NodeMatch) -> PrefixSource | None:
        """A KVSource for the prompt's prefix held by ``remote`` (blocks this node's store holds
        come from here), or None when the local store holds at least as much (engine thread)."""
        bs = self.layout.block_size
        usable = min(remote.num_blocks, (len(prompt_ids) - 1) // bs)
        if usable <= 0:
            return None
        chain = self.hashes(prompt_ids[:usable * bs])
        lease_id = LeaseId(f"{request_id}#prefix")
        with self._lock:
            held = self.store.lookup(chain).num_blocks
            if held >= usable:
                return None
            local = self.store.acquire(lease_id, chain[:held]) if held else []

        def release() -> None:
            if local:
                with self._lock:
                    self.store.release(lease_id)

        return PrefixSource(request_id, self.layout, self.pool, local, chain, remote, (self.shm, self.tcp),
                            self.config.pull_timeout_s, release, self._imported)

    def publish(self, export: KVExport, prompt_ids: Sequence[int]) -> Published:
        with self._lock:
            return self._publish(export, prompt_ids)

    def _publish(self, export: KVExport, prompt_ids: Sequence[int]) -> Published:
        """Copies the export into the pool under a lease; RuntimeError when the pool is full."""
        start = time.perf_counter_ns()
        layout = self.layout
        if KVLayoutSpec.of(export.layout) != layout:
            raise RuntimeError(f"export layout {export.layout} differs from this node's {layout}")
        if len(prompt_ids) < export.num_tokens:
            raise ValueError(f"prompt_ids: {len(prompt_ids)} tokens, the export holds {export.num_tokens}")
        num_blocks = len(export.block_ids)
        hashes = self.hashes(prompt_ids[:export.num_tokens])
        lease_id = LeaseId(f"{export.request_id}#lease")
        held = self.store.acquire(lease_id, hashes)
        new = self.store.allocate_slots(num_blocks - len(held))
        if new is None:
            self.store.release(lease_id)
            raise RuntimeError(f"KV pool of {self.config.node_id} is full: no room for {num_blocks} blocks")
        try:
            self._copy(export, len(held), new)
        except BaseException:
            self.store.abandon_slots(new)
            self.store.release(lease_id)
            raise
        num_new_full = len(hashes) - len(held)
        self.store.publish(lease_id, hashes[len(held):], new[:num_new_full])
        full_slots = list(self.store.lookup(hashes).slots)  # publish may dedupe onto stored copies
        partial = new[num_new_full:]
        slots = tuple(full_slots + partial)
        self.leases.add(Lease(lease_id, export.request_id, slots, partial[0] if partial else None,
                              time.monotonic() + self.config.lease_s))
        # the slots' generations: a pull after the lease ended and a slot was reused fails as stale
        handle = KVHandle(export.request_id, tuple(hashes), export.num_tokens, self.endpoint,
                          self.config.node_id, "active", layout, "shm", self.pool.handle.name, slots,
                          self.allocator.generations(slots), self._device_ref(export.block_ids))
        num_bytes = export.num_tokens * layout.bytes_per_token_per_layer * layout.num_layers
        return Published(handle, num_bytes, time.perf_counter_ns() - start)

    def _copy(self, export: KVExport, first_block: int, slots: list[int]) -> None:
        """Layers in order, only blocks ``first_block``.. (the ones the store does not hold)."""
        if not slots:
            return
        for layer in range(self.layout.num_layers):
            data = export.layer(layer)[first_block:].contiguous().cpu()
            self.pool.layer(layer)[slots] = data.view(torch.uint8).reshape(len(slots), -1).numpy()

    def _device_ref(self, block_ids: Sequence[int]) -> bytes:
        share = self._device
        if share is None:
            return b""
        gens = tuple(int(g) for g in share.table.array[list(block_ids)])
        return cuda_ipc.DeviceRef(share.uuid, share.layers, share.table.name, len(share.table.array),
                                  tuple(block_ids), gens).to_bytes()

    def source(self, data: bytes) -> PulledKVSource | DeviceKVSource:
        """A KVSource for a handle (device to device when the producer shares this engine's
        GPU); ValueError naming context_phase_params when it is bad."""
        handle = open_handle(data, self.layout)
        share = self._device
        if not handle.device_ref or share is None:
            return PulledKVSource(handle, self.shm, self.tcp, self.config.pull_timeout_s, self._imported)
        pulled = PulledKVSource(handle, self.shm, self.tcp, self.config.pull_timeout_s)
        try:
            ref = cuda_ipc.DeviceRef.from_bytes(handle.device_ref)
        except ValueError as exc:
            raise ValueError(f"context_phase_params: {exc}") from None
        if ref.device_uuid != share.uuid:
            return PulledKVSource(handle, self.shm, self.tcp, self.config.pull_timeout_s, self._imported)
        return DeviceKVSource(ref, share.device, pulled, self._imported)

    def _imported(self, path: str) -> None:
        """A source finished its last layer over ``path`` (import threads call this)."""
        with self._counts_lock:
            self.import_counts[path] += 1

    def maintain(self, now: float | None = None) -> int:
        """Releases pulled and expired leases; returns how many."""
        due = self.leases.due(now)
        for lease in due:
            self._release(lease)
        return len(due)

    def discard(self, request_id: str) -> bool:
        """Releases ``request_id``'s lease (its consumer will never pull); False if none."""
        lease = self.leases.discard(request_id)
        if lease is not None:
            self._release(lease)
        return lease is not None

    def _release(self, lease: Lease) -> None:
        with self._lock:
            self.store.release(lease.lease_id)
            if lease.partial_slot is not None:
                self.store.abandon_slots([lease.partial_slot])

    def check_integrity(self) -> None:
        """RuntimeError unless the pool allocator and the store agree (free + used == total)."""
        self.allocator.check_integrity()
        self.store.check_integrity()

    def close(self) -> None:
        """Stops the block server and transports, then unlinks the pool. Idempotent."""
        self.tcp.close()
        self.shm.close()
        if self._device is not None:
            self._device.table.close()
        try:
            self.pool.close()
        except RuntimeError as exc:  # a leftover view: the file is unlinked regardless
            LOG.warning("closing the KV pool: %s", exc)


@dataclass(slots=True)
class _DeviceShare:
    """A CUDA engine's shared cache: device, its UUID, block generations, layer descriptors."""

    device: torch.device
    uuid: str
    table: cuda_ipc.GenerationTable
    layers: list[list[Any]]
