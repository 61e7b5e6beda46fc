"""Same-host transport through the producer's shared-memory pool.

The consumer maps the producer's HostBlockPool (from the spec's PoolHandle) and copies each
published layer straight from the producer's blocks into its destination runs: one copy, no
staging buffer. Progress travels through an entry of the pool's control table (see
shm_control.py; created once per producer pool, mapped once per consumer transport, so a
transfer opens no file): ``publish_layer`` bumps *published* after the layer's bytes are
written, the consumer bumps *acked* after copying a layer. Either side marks its state when it
gives up, so the other fails fast (RemoteError) instead of waiting for its deadline; a consumer
whose entry was reclaimed and reused (a stale generation) fails with RemoteError too.
The consumer finds its entry by the spec's transfer_id (a 64-bit key in the entry).
This module holds the producer side and the transport; the consumer's handle is in shm_recv.py.
"""

from __future__ import annotations

import threading
import time

from kvbridge.errors import RemoteError, TransferTimeout, describe_pending
from kvbridge.handle import KVHandle
from kvbridge.pool import HostBlockPool, PoolHandle
from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import (
    LayerBuffers,
    RecvHandle,
    SendHandle,
    SlotPins,
    TransferSpec,
    Transport,
    TransportOptions,
    check_next_layer,
    wait_until,
)
from kvbridge.transport.regions import PoolRegion
from kvbridge.transport.shm_control import (
    ACKED,
    CONSUMER_ABORTED,
    CSTATE,
    PUBLISHED,
    ProducerTable,
    TableView,
    acquire_table,
    release_table,
    transfer_key,
    untag,
)
from kvbridge.transport.shm_pull import ShmPullHandle
from kvbridge.transport.shm_recv import ShmRecvHandle
from kvbridge.transport.tcp_conn import ConnectionPool

__all__ = ["ShmRecvHandle", "ShmSendHandle", "ShmTransport", "shm_pull_spec"]


class ShmSendHandle(SendHandle):
    """Holds one control-table entry (and the pins) from construction to ``close()``."""

    def __init__(self, spec: TransferSpec, pins: SlotAllocator | None, table: ProducerTable,
                 grace_s: float) -> None:
        self.spec = spec
        self._table: ProducerTable | None = table
        self._entry, self._gen = table.allocate(transfer_key(spec.transfer_id), spec.num_layers, spec.layer_nbytes)
        self._grace_s = grace_s
        self._published = 0
        self._pins = SlotPins(pins, spec.source_slots)

    def publish_layer(self, layer: int) -> None:
        check_next_layer(layer, self._published, self.spec.num_layers)
        if self._table is None:
            raise RuntimeError(f"shm transfer {self.spec.transfer_id} is closed")
        self._published += 1
        self._table.view.set(self._entry, PUBLISHED, self._published)

    def _consumer_word(self, word: int) -> int:
        """The consumer's word for our generation; 0 before it wrote one and once closed."""
        if self._table is None:
            return 0
        return untag(self._table.view.get(self._entry, word), self._gen) or 0

    def poll(self) -> int:
        return self._consumer_word(ACKED)

    def wait(self, deadline: float) -> None:
        start = time.monotonic()
        n = self.spec.num_layers
        done = wait_until(lambda: self.poll() >= n or self._consumer_word(CSTATE) != 0, deadline)
        if self._consumer_word(CSTATE) == CONSUMER_ABORTED and self.poll() < n:
            raise RemoteError("aborted", f"shm transfer {self.spec.transfer_id}: the consumer gave up")
        if not done:
            raise TransferTimeout(
                f"shm send {self.spec.transfer_id}", deadline - start,
                f"consumer acks for {describe_pending(list(range(self.poll(), n)))}",
            )

    def close(self) -> None:
        if self._table is not None:
            table, self._table = self._table, None
            table.release(self._entry, self._grace_s)  # marks an unfinished transfer aborted first
        self._pins.release()


def shm_pull_spec(handle: KVHandle, num_held: int = 0) -> TransferSpec:
    """The spec that pulls a finished prefill's blocks by handle (pinned by slot and generation
    through its block server), all but the first ``num_held`` (which the consumer holds)."""
    if not handle.pool_name:
        raise ValueError(f"handle.pool_name: request {handle.request_id!r} has no shared-memory pool")
    layout = handle.layout
    return TransferSpec("", layout.num_layers, (len(handle.block_slots) - num_held) * layout.block_bytes,
                        endpoint=handle.source_endpoint, source_slots=handle.block_slots,
                        pool_name=handle.pool_name, source_gens=handle.block_gens, num_held=num_held)


class ShmTransport(Transport):
    """Same-host transfers; keeps the producer pools it mapped (and its pin connections) until ``close()``.

    Two receive modes: a published transfer (spec with a ``transfer_id`` and the producer's
    pool; progress through the pool's control table) or, with an empty ``transfer_id``, a pull by KV
    handle (spec from :func:`shm_pull_spec`; the slots are pinned through the producer's
    block server at ``spec.endpoint`` for the pull, see shm_pull.py).
    """

    name = "shm"
    pulls_by_handle = True

    def __init__(self, *, token: str | None = None, timeout_s: float = 60.0, connect_timeout_s: float = 5.0,
                 control_entries: int = 1024, reclaim_grace_s: float = 1.0) -> None:
        """``control_entries``: transfers a pool's control table holds at once (in flight or
        retiring); ``reclaim_grace_s``: how long an entry whose producer closed first waits for
        its consumer's final word before reuse."""
        if control_entries < 1 or reclaim_grace_s < 0:
            raise ValueError(f"control_entries/reclaim_grace_s: expected >= 1 / >= 0, "
                             f"got {control_entries}/{reclaim_grace_s}")
        self._pools: dict[str, HostBlockPool] = {}
        self._tables: dict[str, ProducerTable] = {}  # pools we publish from
        self._views: dict[str, TableView] = {}  # pools we receive from
        self._lock = threading.Lock()
        self._control_entries = control_entries
        self._grace_s = reclaim_grace_s
        self.timeout_s = timeout_s
        self.connections = ConnectionPool(token=token, peer="shm-pin", connect_timeout_s=connect_timeout_s,
                                          sock_buf_bytes=0)

    @classmethod
    def from_options(cls, options: TransportOptions) -> ShmTransport:
        return cls(token=options.token, timeout_s=options.timeout_s,
                   connect_timeout_s=options.connect_timeout_s)

    @staticmethod
    def spec_for(transfer_id: str, pool: HostBlockPool, slots: tuple[int, ...]) -> TransferSpec:
        layout = pool.layout
        return TransferSpec(
            transfer_id, layout.num_layers, len(slots) * layout.block_bytes, pool=pool.handle, source_slots=slots
        )

    def start_send(self, spec: TransferSpec, source: LayerBuffers, pins: SlotAllocator | None = None) -> SendHandle:
        if spec.pool is None or not spec.transfer_id:
            raise ValueError("spec: shm needs a transfer_id and the producer's pool handle")
        spec.check_buffers(source, "source")
        return ShmSendHandle(spec, pins, self._producer_table(spec.pool.name), self._grace_s)

    def _producer_table(self, pool_name: str) -> ProducerTable:
        with self._lock:
            table = self._tables.get(pool_name)
            if table is None:
                table = self._tables[pool_name] = acquire_table(pool_name, self._control_entries)
            return table

    def control_table(self, pool_name: str) -> ProducerTable | None:
        """The control table this transport publishes ``pool_name``'s transfers through, if any."""
        with self._lock:
            return self._tables.get(pool_name)

    def _table_view(self, pool_name: str, refresh: bool) -> TableView | None:
        """The producer's table of ``pool_name``, mapped once (again after ``refresh``)."""
        view = None if refresh else self._views.get(pool_name)
        if view is not None:
            return view
        with self._lock:
            view = None if refresh else self._views.get(pool_name)
            if view is None:
                view = TableView.attach(pool_name)
                if view is not None:
                    self._views[pool_name] = view  # a replaced view is unmapped when its handles drop it
            return view

    def start_recv(self, spec: TransferSpec, dest: LayerBuffers) -> RecvHandle:
        spec.check_buffers(dest, "dest")
        if not spec.transfer_id:
            if not spec.endpoint or not spec.source_slots:
                raise ValueError("spec: an shm pull by handle needs the block server endpoint and source slots")
            return ShmPullHandle(spec, dest, connections=self.connections, attach=self.attach,
                                 timeout_s=self.timeout_s)
        if spec.pool is None:
            raise ValueError("spec: shm needs a transfer_id and the producer's pool handle")
        pool_name = spec.pool.name
        return ShmRecvHandle(spec, PoolRegion.of_pool(self.attach(spec.pool), spec.source_slots), dest,
                             lambda refresh: self._table_view(pool_name, refresh))

    def attach(self, handle: PoolHandle) -> HostBlockPool:
        """The producer pool ``handle`` names, mapped once and kept until ``close()``."""
        pool = self._pools.get(handle.name)  # a pool mapped before needs no lock (dict reads are atomic)
        if pool is None:
            with self._lock:
                pool = self._pools.get(handle.name)
                if pool is None:
                    pool = self._pools[handle.name] = HostBlockPool.attach(handle)
        if pool.layout != handle.layout:
            raise ValueError(f"handle.layout: pool {handle.name!r} is mapped with {pool.layout}, not {handle.layout}")
        return pool

    def close(self) -> None:
        self.connections.close()
        with self._lock:
            pools, self._pools = self._pools, {}
            tables, self._tables = self._tables, {}
            views, self._views = self._views, {}
        for pool_name in tables:
            release_table(pool_name)
        for view in views.values():
            view.close()
        for pool in pools.values():
            pool.close()
