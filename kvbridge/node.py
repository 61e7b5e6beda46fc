"""kvbridge's front door: ``KVNode``, one node of the cluster, configured by ``KVNodeConfig``.

One per engine (e.g. per pd_worker). It owns:
- a HostBlockPool in /dev/shm ([num_layers][pool_blocks][block_bytes]) and its SlotAllocator;
- its transports, opened through the transport registry: tcp, whose BlockServer
  (``config.host``, a free port) serves the pool (peers pull slots over tcp, or pin them and
  map the pool: shm), and shm; the registry also picks which one pulls a handle
  (``config.transport`` or KVBRIDGE_TRANSPORT, default "auto": see configured_transport);
- a BlockStore over the pool (active + hot history tier, LRU; a cold tier in process memory
  when ``cold_capacity_blocks`` > 0) and ``hooks``, the engine's KVHooks over it (local prefix
  reuse);
- the leases that keep published KV pinned until its consumer pulled it (leases.py);
- with ``config.master_address``: a MasterLink (registration, heartbeats, the store's radix
  events) and a RemoteFinder (which other node holds a longer prefix).

``publish`` (producer side) copies an export's blocks into the pool (only the blocks the store
does not already hold, layer by layer), indexes its full blocks under a lease and returns the
KVHandle. ``open`` (consumer side) validates a handle and returns a KV source (pull.py) that
reads the handle's leading blocks this node's store holds from its own pool and pulls only the
others; ``find_remote`` + ``pull`` import a prefix another node holds (remote.py). Sources raise
PullFailed when they cannot deliver and say what they move (``num_pulled_bytes``).
On a CUDA engine, ``attach_device`` shares the engine's cache (CUDA IPC) and keeps its block
generations in /dev/shm: handles then also carry a DeviceRef, and a consumer engine on the same
GPU reads the blocks device to device (DeviceKVSource), the pool copy being its fallback.
Threads: every method except ``find_remote``, ``start_heartbeats`` and ``close`` runs on the
engine thread (the store and the hooks are not thread-safe; block-server threads resolve
chains under the node's lock and only report ended pulls to the lease table; a source's
import thread releases its store lease under the node's lock).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvbridge.handle import KVHandle, KVLayoutSpec
from kvbridge.hashing import BlockHash, hash_blocks
from kvbridge.hooks import LockedHooks, PoolMover, StoreKVHooks
from kvbridge.leases import Lease, LeaseId, LeaseTable
from kvbridge.master.client import MasterClient
from kvbridge.master.link import MasterLink
from kvbridge.master.messages import LoadReport, NodeMatch
from kvbridge.node_config import ArrayPool, KVExportLike, KVNodeConfig, Published
from kvbridge.pool import HostBlockPool, PoolLayout
from kvbridge.pull import DeviceKVSource, PrefixSource, PulledKVSource, open_handle
from kvbridge.radix import TIERS
from kvbridge.remote import RemoteFinder, RemoteRest
from kvbridge.slots import SlotAllocator
from kvbridge.store import BlockStore
from kvbridge.tiers import InMemorySlotAllocator, StoreConfig
from kvbridge.transport import cuda_ipc
from kvbridge.transport.registry import (
    AUTO,
    TRANSPORT_ENV,
    TransportOptions,
    check_transport,
    choose_pull_transport,
    open_transport,
)
from kvbridge.transport.shm import ShmTransport
from kvbridge.transport.tcp import TcpTransport

LOG = logging.getLogger(__name__)
__all__ = ["KVNode", "KVNodeConfig", "Published", "pool_name"]


def pool_name(pgid: int, pid: int) -> str:
    """A fresh pool name tagged with the server's process group and the owner's pid: a worker
    stub runs in tritonserver's group, so the launcher can unlink what a killed stub left
    behind (shm_cleanup.py), all of the group's at the end or one dead stub's at once."""
    return f"kvb-pool-g{pgid}-p{pid}-{secrets.token_hex(6)}"


def configured_transport(config: KVNodeConfig) -> str:
    """``config.transport``, else KVBRIDGE_TRANSPORT, else "auto", checked through the registry:
    ValueError / TransportUnavailable naming the field or the variable (registry.check_transport)."""
    if config.transport is not None:
        check_transport(config.transport, "transport")
        return config.transport
    value = os.environ.get(TRANSPORT_ENV, "").strip() or AUTO
    check_transport(value, TRANSPORT_ENV)
    return value


class KVNode:
    """See the module docstring. ``close()`` stops the master link, the block server and the
    transports, then unlinks the pool."""

    def __init__(self, config: KVNodeConfig, layout: KVLayoutSpec) -> None:
        self.config = config
        self.transport = configured_transport(config)  # before anything is opened: nothing to undo
        LOG.info("KV pulls of %s: %s; %s", config.node_id, choose_pull_transport(self.transport, True).reason,
                 choose_pull_transport(self.transport, False).reason)
        self.layout = layout
        self.leases = LeaseTable()
        self.pool = HostBlockPool.create(PoolLayout(layout.num_layers, config.pool_blocks, layout.block_bytes),
                                         name=pool_name(os.getpgrp(), os.getpid()))
        self.allocator = SlotAllocator(config.pool_blocks, on_unpin=self.leases.pulled)
        self._lock = threading.RLock()  # the store: the engine thread, and resolves from peers
        self.link: MasterLink | None = None
        self.finder: RemoteFinder | None = None
        try:
            self.tcp, self.shm = self._open_transports()
            self.tcp.serve_pool(self.pool, self.allocator, self.resolve)
            if config.master_address is not None:
                self.link = MasterLink(self._master_client(config.master_timeout_s), self._holdings)
                self.finder = RemoteFinder(self._master_client(config.lookup_timeout_s), config.node_id,
                                           config.lookup_cooldown_s)
            self.store = self._new_store()
        except BaseException:
            self.close()
            raise
        self.hooks = LockedHooks(StoreKVHooks(self.store, self.pool, layout.block_size,
                                              extra_key=config.model_id), self._lock)
        self._device: cuda_ipc.DeviceShare | None = None
        self.import_counts = {"device": 0, "host": 0, "remote": 0}  # KV imports completed, by path
        self._open_ids = itertools.count()  # a handle opened twice gets two leases
        self._counts_lock = threading.Lock()

    def _open_transports(self) -> tuple[TcpTransport, ShmTransport]:
        config = self.config
        options = TransportOptions(config.host, None, config.pull_timeout_s, min(config.pull_timeout_s, 5.0))
        tcp = open_transport("tcp", options)
        shm = open_transport("shm", options)
        if not isinstance(tcp, TcpTransport) or not isinstance(shm, ShmTransport):
            raise RuntimeError(f"transport registry: tcp/shm are {type(tcp).__name__}/{type(shm).__name__}")
        return tcp, shm

    def _holdings(self) -> list[tuple[str, list[bytes]]]:
        """Every block hash the store holds, per tier (for a re-publish to the master)."""
        with self._lock:
            return [(tier, [bytes(h) for h, _ in self.store.blocks(tier)]) for tier in TIERS]

    def _master_client(self, timeout_s: float) -> MasterClient:
        host, port = self.config.master_address or ("", 0)
        return MasterClient(host, port, node_id=self.config.node_id, token=self.config.master_token,
                            timeout_s=timeout_s)

    def _new_store(self) -> BlockStore:
        config, layout = self.config, self.layout
        cold = config.cold_capacity_blocks
        mover = PoolMover(layout.num_layers, self.pool, ArrayPool(layout.num_layers, cold, layout.block_bytes)) \
            if cold else None
        return BlockStore(StoreConfig(config.hot_capacity_blocks, cold, layout.num_layers * layout.block_bytes),
                          self.allocator, InMemorySlotAllocator(cold), mover,
                          listener=self.link.on_event if self.link is not None else None)

    def attach_device(self, block_manager: Any, kv_caches: list[torch.Tensor]) -> None:
        """Shares a CUDA engine's cache and block generations (see the module docstring)."""
        self._device = cuda_ipc.DeviceShare(block_manager, kv_caches)

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

    def start_heartbeats(self, load: Callable[[], LoadReport]) -> None:
        """Registers with the master and reports ``load()`` every heartbeat (no master: no-op)."""
        if self.link is not None:
            self.link.start(self.endpoint, load)

    def find_remote(self, prompt_ids: Sequence[int]) -> NodeMatch | None:
        """Another node holding a longer usable prefix of the prompt, per the master (any
        thread; bounded by the lookup deadline). None without a master."""
        if self.finder is None:
            return None
        usable = (len(prompt_ids) - 1) // self.layout.block_size
        return self.finder.find(self.hashes(prompt_ids[:usable * self.layout.block_size]))

    def pull(self, request_id: str, prompt_ids: Sequence[int], remote: NodeMatch) -> PrefixSource | None:
        """A KV source for the prompt's prefix held by ``remote`` (blocks this node's store holds
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

        rest = RemoteRest(request_id, self.layout, chain, len(local), remote, (self.shm, self.tcp),
                          self.config.pull_timeout_s)
        return PrefixSource(request_id, self.layout, self.pool, local, len(chain), len(chain) * bs, rest,
                            self._releaser(lease_id if local else None), self._imported, "remote")

    def _releaser(self, lease_id: LeaseId | None) -> Callable[[], None]:
        """Releases the store lease ``lease_id`` (None: nothing held) under the node's lock, so
        any thread may call it (the store's listener only queues)."""
        def release() -> None:
            if lease_id is not None:
                with self._lock:
                    self.store.release(lease_id)
        return release

    def publish(self, export: KVExportLike, prompt_ids: Sequence[int]) -> Published:
        """Copies the export into the pool under a lease; RuntimeError when the pool is full or
        the export's layout differs, ValueError when ``prompt_ids`` is shorter than the export."""
        with self._lock:
            return self._publish(export, prompt_ids)

    def _publish(self, export: KVExportLike, prompt_ids: Sequence[int]) -> Published:
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
        device_ref = b"" if self._device is None else self._device.ref(export.block_ids)
        handle = KVHandle(export.request_id, tuple(hashes), export.num_tokens, self.endpoint,
                          self.config.node_id, "active", layout, "shm", self.pool.handle.name, slots,
                          self.allocator.generations(slots), device_ref)
        num_bytes = export.num_tokens * layout.bytes_per_token_per_layer * layout.num_layers
        return Published(handle, num_bytes, time.perf_counter_ns() - start)

    def _copy(self, export: KVExportLike, first_block: int, slots: list[int]) -> None:
        """Layers in order, only blocks ``first_block``.. (the ones the store does not hold)."""
        if not slots:
            return
        for layer in range(self.layout.num_layers):
            data = export.layer(layer)[first_block:].contiguous().cpu()
            self.pool.layer(layer)[slots] = data.view(torch.uint8).reshape(len(slots), -1).numpy()

    def open(self, data: bytes) -> PrefixSource | PulledKVSource | DeviceKVSource:
        """A KV source for a handle; ValueError naming context_phase_params when it is bad.

        The leading blocks of the handle's chain that this node's store holds (e.g. a later
        turn's history) are leased now (engine thread) and read from this node's pool; only the
        others are pulled from the producer (PrefixSource; a PulledKVSource when none is held).
        The source releases the lease after its last layer, when it fails, or on ``close()``.
        A producer sharing this engine's GPU is read device to device, the whole handle."""
        handle = open_handle(data, self.layout)
        share = self._device
        if handle.device_ref and share is not None:
            try:
                ref = cuda_ipc.DeviceRef.from_bytes(handle.device_ref)
            except ValueError as exc:
                raise ValueError(f"context_phase_params: {exc}") from None
            if ref.device_uuid == share.uuid:
                return DeviceKVSource(ref, share.device, self._pulled(handle), self._imported)
        lease_id = LeaseId(f"{handle.request_id}#held{next(self._open_ids)}")
        with self._lock:
            local = self.store.acquire(lease_id, [BlockHash(h) for h in handle.block_hashes])
            if not local:
                self.store.release(lease_id)
        if not local:
            return self._pulled(handle, self._imported)

        def rest(_deadline: float) -> PulledKVSource:
            return self._pulled(handle, num_held=len(local))

        return PrefixSource(handle.request_id, self.layout, self.pool, local, len(handle.block_slots),
                            handle.num_tokens, rest, self._releaser(lease_id), self._imported, "host")

    def _pulled(self, handle: KVHandle, on_done: Callable[[str], None] | None = None,
                num_held: int = 0) -> PulledKVSource:
        """A pull of ``handle``'s blocks from ``num_held`` on, over the configured transport."""
        return PulledKVSource(handle, self.shm, self.tcp, self.config.pull_timeout_s, on_done, num_held,
                              self.transport)

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
        """Stops the master link and lookups, the block server and the transports, then unlinks
        the pool. Idempotent."""
        finder, self.finder = self.finder, None
        if finder is not None:
            finder.close()
        link, self.link = self.link, None
        if link is not None:
            link.close()
        for name in ("tcp", "shm"):
            transport = getattr(self, name, None)
            if transport is not None:
                transport.close()
        device, self._device = getattr(self, "_device", None), None
        if device is not None:
            device.close()
        try:
            self.pool.close()
        except RuntimeError as exc:  # a leftover view: the file is unlinked regardless
            LOG.warning("closing the KV pool: %s", exc)
