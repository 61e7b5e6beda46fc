"""Same-host transport through the producer's shared-memory pool.

The consumer maps the producer's HostBlockPool (from the spec's PoolHandle) and copies each
published layer straight from the producer's blocks into its destination runs: one copy, no
staging buffer. Progress travels through a 64-byte control file ``/dev/shm/kvb-xfer-<id>``
(int64 words: magic, num_layers, published, acked, state, layer_nbytes) created by the producer:
``publish_layer`` bumps *published* after the layer's bytes are written, the consumer bumps
*acked* after copying a layer. Either side sets *state* when it gives up, so the other fails
fast (RemoteError) instead of waiting for its deadline. Word stores are single aligned
8-byte writes, and x86's store order makes data-before-counter visible in that order.
The producer owns (creates, unlinks) the control file; the consumer only maps it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Callable

from kvbridge.errors import RemoteError, TransferTimeout, describe_pending
from kvbridge.handle import KVHandle
from kvbridge.pool import SHM_DIR, HostBlockPool, PoolHandle, SlotAllocator
from kvbridge.transport.base import (
    LayerBuffers,
    PoolRegion,
    RecvHandle,
    SendHandle,
    TransferSpec,
    Transport,
    copy_layers,
)
from kvbridge.transport.shm_pull import ShmPullHandle
from kvbridge.transport.tcp_conn import ConnectionPool

_CTL_MAGIC = 0x4B56425843544C31  # "KVBXCTL1"
_MAGIC, _NUM_LAYERS, _PUBLISHED, _ACKED, _STATE, _LAYER_NBYTES = range(6)
_RUNNING, _PRODUCER_ABORTED, _CONSUMER_ABORTED = 0, 1, 2
_CTL_BYTES = 64


class _Control:
    """The 64-byte control file of one transfer, as eight int64 words (aligned single stores)."""

    def __init__(self, name: str, create: bool, spec: TransferSpec | None = None) -> None:
        self.path = f"{SHM_DIR}/{name}"
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR if create else os.O_RDWR
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, _CTL_BYTES)
            self._mm: mmap.mmap | None = mmap.mmap(fd, _CTL_BYTES)
        finally:
            os.close(fd)
        self._words: memoryview | None = memoryview(self._mm).cast("q")
        if spec is not None:
            self.set(_NUM_LAYERS, spec.num_layers)
            self.set(_LAYER_NBYTES, spec.layer_nbytes)
            self.set(_MAGIC, _CTL_MAGIC)

    def get(self, word: int) -> int:
        """The word's value; 0 once closed (a closed transfer reports no progress)."""
        return 0 if self._words is None else int(self._words[word])

    def set(self, word: int, value: int) -> None:
        """Stores the word; ignored once closed (the transfer is over for this side)."""
        if self._words is not None:
            self._words[word] = value

    def close(self, unlink: bool) -> None:
        if self._mm is None or self._words is None:
            return
        words, self._words = self._words, None
        words.release()
        mm, self._mm = self._mm, None
        mm.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _control_name(transfer_id: str) -> str:
    return f"kvb-xfer-{transfer_id}"


def _wait_until(ready: Callable[[], bool], deadline: float) -> bool:
    """Polls ``ready`` with a short exponential backoff (20 us .. 1 ms) until the deadline."""
    pause = 2e-5
    while not ready():
        if time.monotonic() >= deadline:
            return ready()
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
    return True


class ShmSendHandle(SendHandle):
    def __init__(self, spec: TransferSpec, pins: SlotAllocator | None) -> None:
        self.spec = spec
        self._ctl = _Control(_control_name(spec.transfer_id), create=True, spec=spec)
        self._published = 0
        self._pins = pins
        if pins is not None:
            pins.pin(spec.source_slots)

    def publish_layer(self, layer: int) -> None:
        if layer != self._published or layer >= self.spec.num_layers:
            raise ValueError(f"layer: expected to publish layer {self._published} next, got {layer}")
        self._published += 1
        self._ctl.set(_PUBLISHED, self._published)

    def poll(self) -> int:
        return self._ctl.get(_ACKED)

    def wait(self, deadline: float) -> None:
        start = time.monotonic()
        n = self.spec.num_layers
        done = _wait_until(lambda: self.poll() >= n or self._ctl.get(_STATE) != _RUNNING, deadline)
        if self._ctl.get(_STATE) == _CONSUMER_ABORTED and self.poll() < n:
            raise RemoteError("aborted", f"shm transfer {self.spec.transfer_id}: the consumer gave up")
        if not done:
            raise TransferTimeout(
                f"shm send {self.spec.transfer_id}", deadline - start,
                f"consumer acks for {describe_pending(list(range(self.poll(), n)))}",
            )

    def close(self) -> None:
        if self._ctl.get(_ACKED) < self.spec.num_layers:
            self._ctl.set(_STATE, _PRODUCER_ABORTED)
        self._ctl.close(unlink=True)
        if self._pins is not None:
            pins, self._pins = self._pins, None
            pins.unpin(self.spec.source_slots)


class ShmRecvHandle(RecvHandle):
    def __init__(self, spec: TransferSpec, source: PoolRegion, dest: LayerBuffers) -> None:
        self.spec = spec
        self.num_layers = spec.num_layers
        self._buffers: tuple[PoolRegion, LayerBuffers] | None = (source, dest)
        self._ctl: _Control | None = None
        self._copied = 0
        self._closed = False

    def poll(self) -> int:
        return self._copied

    def _step(self) -> bool:
        """Copies the next published layer if there is one; True when it made progress."""
        if self._ctl is None:
            try:
                self._ctl = _Control(_control_name(self.spec.transfer_id), create=False)
            except FileNotFoundError:
                return False
            if self._ctl.get(_MAGIC) != _CTL_MAGIC:
                self._ctl.close(unlink=False)
                self._ctl = None
                return False
        published = self._ctl.get(_PUBLISHED)
        if published > self._copied:
            if self._buffers is None:
                raise RuntimeError(f"shm transfer {self.spec.transfer_id} is closed")
            source, dest = self._buffers
            copy_layers(source, dest, self._copied, published)  # every layer published so far, at once
            self._copied = published
            self._ctl.set(_ACKED, self._copied)
            return True
        if self._ctl.get(_STATE) == _PRODUCER_ABORTED:
            raise RemoteError("aborted", f"shm transfer {self.spec.transfer_id}: the producer gave up")
        return False

    def wait_layer(self, layer: int, deadline: float) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: {layer} out of range [0, {self.num_layers})")
        if self._closed:
            raise RuntimeError(f"shm transfer {self.spec.transfer_id} is closed")
        start = time.monotonic()
        while self._copied <= layer:
            if not _wait_until(self._step, deadline):
                raise TransferTimeout(
                    f"shm recv {self.spec.transfer_id}", deadline - start,
                    describe_pending(list(range(self._copied, layer + 1))),
                )

    def close(self) -> None:
        self._closed = True
        self._buffers = None  # drop our views of both pools
        if self._ctl is not None:
            if self._copied < self.num_layers:
                self._ctl.set(_STATE, _CONSUMER_ABORTED)
            self._ctl.close(unlink=False)
            self._ctl = None


def shm_pull_spec(handle: KVHandle) -> TransferSpec:
    """The spec that pulls a finished prefill's blocks by handle (pinned through its block server)."""
    if not handle.pool_name:
        raise ValueError(f"handle.pool_name: request {handle.request_id!r} has no shared-memory pool")
    layout = handle.layout
    return TransferSpec("", layout.num_layers, len(handle.block_slots) * layout.block_bytes,
                        endpoint=handle.source_endpoint, source_slots=handle.block_slots,
                        pool_name=handle.pool_name)


class ShmTransport(Transport):
    """Same-host transfers; keeps the producer pools it mapped (and its pin connections) until ``close()``.

    Two receive modes: a published transfer (spec with a ``transfer_id`` and the producer's
    pool; progress through the control file) or, with an empty ``transfer_id``, a pull by KV
    handle (spec from :func:`shm_pull_spec`; the slots are pinned through the producer's
    block server at ``spec.endpoint`` for the pull, see shm_pull.py).
    """

    name = "shm"

    def __init__(self, *, token: str | None = None, timeout_s: float = 60.0, connect_timeout_s: float = 5.0) -> None:
        self._pools: dict[str, HostBlockPool] = {}
        self._lock = threading.Lock()
        self.timeout_s = timeout_s
        self.connections = ConnectionPool(token=token, peer="shm-pin", connect_timeout_s=connect_timeout_s,
                                          sock_buf_bytes=0)

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
        return ShmSendHandle(spec, pins)

    def start_recv(self, spec: TransferSpec, dest: LayerBuffers) -> RecvHandle:
        spec.check_buffers(dest, "dest")
        if not spec.transfer_id:
            if not spec.endpoint or not spec.source_slots:
                raise ValueError("spec: an shm pull by handle needs the block server endpoint and source slots")
            return ShmPullHandle(spec, dest, connections=self.connections, attach=self.attach,
                                 timeout_s=self.timeout_s)
        if spec.pool is None:
            raise ValueError("spec: shm needs a transfer_id and the producer's pool handle")
        return ShmRecvHandle(spec, PoolRegion(self.attach(spec.pool).array, spec.source_slots), dest)

    def attach(self, handle: PoolHandle) -> HostBlockPool:
        """The producer pool ``handle`` names, mapped once and kept until ``close()``."""
        with self._lock:
            pool = self._pools.get(handle.name)
            if pool is None or pool.layout != handle.layout:
                if pool is not None:
                    raise ValueError(f"handle.layout: pool {handle.name!r} is mapped with {pool.layout}, "
                                     f"not {handle.layout}")
                pool = self._pools[handle.name] = HostBlockPool.attach(handle)
            return pool

    def close(self) -> None:
        self.connections.close()
        with self._lock:
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()
