"""The pull side of a hand-off: KV sources that read a prefill's KV by handle, layer by layer.

A source has the engine's KVSource shape (``num_tokens``, ``read_layer(layer, dst, deadline)``,
``close()``, ``elapsed_ns``) and says what it moves (``num_pulled_bytes``); kvbridge imports
nothing from the engine, so a failed or late source raises kvbridge's PullFailed and the
caller's adapter maps it to its own error.

``open_handle`` validates ``context_phase_params`` (KVHandle.from_bytes + check_layout against
this node) and raises ValueError naming the field, so a corrupted or mismatched handle is the
request's own INVALID_ARG. ``PulledKVSource`` starts its pull on the first ``read_layer`` over
the transport ``pull_transport`` picks through the transport registry
(``registry.choose_pull_transport``: the node's configured transport, or "auto": an optional
one that is installed and pulls by handle, else shm when the source pool is a shared-memory
file of this host, else tcp), receives layer by layer into a host staging buffer and copies each layer
into the destination as soon as it arrived. It may skip the handle's first blocks
(``num_held``): the transports then move only the others (TransferSpec.num_held). Any failure
or a passed deadline raises PullFailed (the consumer then recomputes); the pull is closed on
failure, after the last layer, or by ``close()``.
``PrefixSource`` is the composite: the first blocks of a chain from this node's own pool (the
blocks its store holds, under a lease), the rest from a PulledKVSource: a hand-off's producer
(KVNode.open) or a peer holding a prompt's prefix (KVNode.pull, remote.py).
``DeviceKVSource`` reads a producer's blocks on the same GPU device to device (CUDA IPC), with
a PulledKVSource as its fallback for any layer it cannot read exactly; it reads the whole handle
(it does not consult this node's store).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from kvbridge.errors import KVBridgeError, PullFailed
from kvbridge.handle import KVHandle, KVLayoutSpec
from kvbridge.pool import SHM_DIR
from kvbridge.transport.base import RecvHandle
from kvbridge.transport.cuda_ipc import DeviceReader, DeviceRef
from kvbridge.transport.regions import ArrayLayers
from kvbridge.transport.registry import AUTO, choose_pull_transport
from kvbridge.transport.shm import ShmTransport, shm_pull_spec
from kvbridge.transport.tcp import TcpTransport, pull_spec

LOG = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PullTransport = Literal["shm", "tcp"]


def open_handle(data: bytes, layout: KVLayoutSpec) -> KVHandle:
    """The validated handle in ``data``; ValueError naming ``context_phase_params.<field>``."""
    try:
        handle = KVHandle.from_bytes(data)
        handle.check_layout(layout)
    except ValueError as exc:  # LayoutMismatch is a ValueError too
        raise ValueError(f"context_phase_params: {exc}") from None
    return handle


def shm_reachable(handle: KVHandle) -> bool:
    """The handle's pool is a shared-memory file of this host (so shm can map it)."""
    host, _ = handle.source_host_port
    return bool(handle.pool_name) and host in LOCAL_HOSTS and \
        os.path.exists(os.path.join(SHM_DIR, handle.pool_name))


def pull_transport(handle: KVHandle, wanted: str = AUTO) -> PullTransport:
    """The transport that pulls ``handle``'s blocks for a node configured with ``wanted`` (the
    registry's choice: with "auto", shm on the producer's host, tcp across hosts, while no
    optional transport pulls by handle)."""
    choice = choose_pull_transport(wanted, shm_reachable(handle))
    if choice.name not in ("shm", "tcp"):
        raise RuntimeError(f"transport registry chose {choice.name!r}, which this pull side cannot drive")
    return "shm" if choice.name == "shm" else "tcp"


class PulledKVSource:
    """KVSource over a handle's blocks from ``num_held`` on (the caller holds the first ones):
    ``read_layer``'s destination has one row per pulled block. ``num_pulled_bytes`` is what
    the pull moves; ``elapsed_ns`` the pull's duration once it finished. With every block
    held nothing moves: the first layer only tells the producer it may end its lease
    (``TcpTransport.release``; a failure there is logged, the read goes on)."""

    def __init__(self, handle: KVHandle, shm: ShmTransport, tcp: TcpTransport, timeout_s: float,
                 on_done: Callable[[str], None] | None = None, num_held: int = 0,
                 transport: str = AUTO) -> None:
        if not 0 <= num_held <= len(handle.block_slots):
            raise ValueError(f"num_held: expected 0..{len(handle.block_slots)}, got {num_held}")
        self.handle = handle
        self._on_done = on_done  # called with "host" after the last layer
        self.num_tokens = handle.num_tokens
        self.num_held = num_held
        self.num_blocks = len(handle.block_slots) - num_held  # the blocks that move
        layout = handle.layout
        self.num_pulled_bytes = self.num_blocks * layout.block_bytes * layout.num_layers
        self.elapsed_ns = 0
        self.transport_name = ""
        self._wanted = transport  # the node's configured transport (registry.choose_pull_transport)
        self._shm, self._tcp = shm, tcp
        self._timeout_s = timeout_s
        self._recv: RecvHandle | None = None
        self._staging: np.ndarray | None = None
        self._start_ns = 0
        self._deadline = float("inf")

    def read_layer(self, layer: int, dst: torch.Tensor, deadline: float) -> None:
        layout = self.handle.layout
        shape = (self.num_blocks, layout.block_size, layout.kv_width)
        if tuple(dst.shape) != shape:
            raise PullFailed(f"layer {layer}: destination {tuple(dst.shape)}, the pull moves {shape}")
        if self.num_blocks == 0:
            if layer == 0:
                self._release_held(deadline)
        else:
            self._receive(layer, deadline)
            if self._staging is None:
                raise PullFailed(f"KV pull of {self.handle.request_id} is closed")
            raw = torch.from_numpy(self._staging[layer])
            dst.copy_(raw.view(getattr(torch, layout.dtype)).view(shape))
        if layer == layout.num_layers - 1:
            self.elapsed_ns = time.perf_counter_ns() - self._start_ns
            self.close()
            if self._on_done is not None:
                self._on_done("host")

    def _receive(self, layer: int, deadline: float) -> None:
        try:
            recv = self._recv or self._open()
            recv.wait_layer(layer, min(deadline, self._deadline))
        except (KVBridgeError, OSError, ValueError, RuntimeError) as exc:
            self.close()
            LOG.warning("KV pull of %s failed (%s): %s", self.handle.request_id, self.transport_name, exc)
            raise PullFailed(f"KV pull of {self.handle.request_id} failed: {exc}") from exc

    def _release_held(self, deadline: float) -> None:
        self._start_ns = time.perf_counter_ns()
        timeout_s = max(1e-3, min(self._timeout_s, deadline - time.monotonic()))
        try:
            self._tcp.release(self.handle, timeout_s)
        except (KVBridgeError, OSError) as exc:  # our copy is complete; the producer's lease expires
            LOG.info("KV of %s: telling %s it was not pulled failed: %s", self.handle.request_id,
                     self.handle.source_node, exc)

    def _open(self) -> RecvHandle:
        self._start_ns = time.perf_counter_ns()
        self._deadline = time.monotonic() + self._timeout_s
        layout = self.handle.layout
        self._staging = np.empty((layout.num_layers, self.num_blocks * layout.block_bytes), np.uint8)
        dest = ArrayLayers(list(self._staging))
        self.transport_name = pull_transport(self.handle, self._wanted)
        if self.transport_name == "shm":
            self._recv = self._shm.start_recv(shm_pull_spec(self.handle, self.num_held), dest)
        else:
            self._recv = self._tcp.start_recv(pull_spec(self.handle, self.num_held), dest)
        return self._recv

    def close(self) -> None:
        """Ends the pull (unpinning the source's slots); idempotent."""
        recv, self._recv = self._recv, None
        if recv is not None:
            try:
                recv.close()
            except (KVBridgeError, OSError) as exc:
                LOG.info("closing a KV pull failed: %s", exc)
        self._staging = None


class PrefixSource:
    """KVSource for ``num_blocks`` blocks of ``num_tokens`` tokens whose first
    ``len(local_slots)`` this node's store holds: those are copied from ``pool`` (kept there by
    a store lease the caller took; ``release`` ends it), the rest come from the PulledKVSource
    that ``open_rest(deadline)`` returns on the first layer (the prefill's producer for a
    hand-off, KVNode.open; a peer holding the prefix, remote.py), which may raise PullFailed.
    ``path`` names the import for ``on_done`` ("host", "remote"), called after the last layer.

    The lease is released after the last layer, when the pull fails, and by ``close()``,
    whichever comes first, exactly once (any thread: ``release`` takes the node's lock).
    ``num_pulled_bytes`` counts only the blocks that move; ``transport_name`` is the pull's.
    """

    def __init__(self, request_id: str, layout: KVLayoutSpec, pool: Any, local_slots: Sequence[int],
                 num_blocks: int, num_tokens: int, open_rest: Callable[[float], PulledKVSource],
                 release: Callable[[], None], on_done: Callable[[str], None] | None = None,
                 path: str = "remote") -> None:
        if not 0 <= len(local_slots) <= num_blocks:
            raise ValueError(f"local_slots: expected at most num_blocks={num_blocks}, got {len(local_slots)}")
        self.request_id, self.layout = request_id, layout
        self.num_local = len(local_slots)
        self.num_tokens = num_tokens
        self.elapsed_ns = 0
        self.num_pulled_bytes = (num_blocks - self.num_local) * layout.block_bytes * layout.num_layers
        self.transport_name = ""  # the pull's ("shm", "tcp"; '' while none moved)
        self._pool, self._local_slots = pool, list(local_slots)
        self._open_rest = open_rest
        self._release: Callable[[], None] | None = release
        self._release_lock = threading.Lock()
        self._on_done, self._path = on_done, path
        self._rest: PulledKVSource | None = None
        self._closed = False
        self._start_ns = 0

    def read_layer(self, layer: int, dst: torch.Tensor, deadline: float) -> None:
        try:
            if self._closed:
                raise PullFailed(f"KV of {self.request_id} is closed")
            if layer == 0:
                self._start_ns = time.perf_counter_ns()
                self._rest = self._open_rest(deadline)
            n = self.num_local
            if n:
                rows = np.ascontiguousarray(self._pool.layer(layer)[self._local_slots])
                dst[:n].copy_(torch.from_numpy(rows).view(dst.dtype).view(dst[:n].shape))
            if self._rest is None:
                raise PullFailed(f"KV of {self.request_id}: layer {layer} read before layer 0")
            self._rest.read_layer(layer, dst[n:], deadline)
            self.transport_name = self._rest.transport_name
        except PullFailed:
            self.close()
            raise
        if layer == self.layout.num_layers - 1:
            self.elapsed_ns = time.perf_counter_ns() - self._start_ns
            self._release_local()
            if self._on_done is not None:
                self._on_done(self._path)

    def _release_local(self) -> None:
        with self._release_lock:
            release, self._release = self._release, None
        if release is not None:
            release()

    def close(self) -> None:
        """Ends the pull and releases the local blocks' lease; idempotent."""
        self._closed = True
        rest, self._rest = self._rest, None
        if rest is not None:
            rest.close()
        self._release_local()


class DeviceKVSource:
    """KVSource over a DeviceRef: each layer copied out of the producer's GPU cache (same GPU,
    CUDA IPC). A layer whose blocks the producer reused meanwhile, and every later one, comes
    through ``fallback`` (the host pool), as does everything when the producer's cache cannot
    be opened. ``path`` says which was used ("device" or "host"); ``on_done(path)`` is called
    once, after the last layer."""

    def __init__(self, ref: DeviceRef, device: torch.device, fallback: PulledKVSource,
                 on_done: Callable[[str], None] | None = None) -> None:
        self.ref = ref
        self.num_tokens = fallback.num_tokens
        self.num_pulled_bytes = fallback.num_pulled_bytes  # either path moves every block
        self.elapsed_ns = 0
        self.path = "device"
        self._device, self._fallback, self._on_done = device, fallback, on_done
        self._reader: DeviceReader | None = None
        self._start_ns = 0

    def read_layer(self, layer: int, dst: torch.Tensor, deadline: float) -> None:
        if layer == 0:
            self._start_ns = time.perf_counter_ns()
        if self.path == "device" and not self._read_device(layer, dst):
            self.path = "host"
            self._close_reader()
        if self.path == "host":
            self._fallback.read_layer(layer, dst, deadline)
        if layer == self._fallback.handle.layout.num_layers - 1:
            self.elapsed_ns = time.perf_counter_ns() - self._start_ns
            self.close()
            if self._on_done is not None:
                self._on_done(self.path)

    def _read_device(self, layer: int, dst: torch.Tensor) -> bool:
        rid = self._fallback.handle.request_id
        try:
            if self._reader is None:
                self._reader = DeviceReader(self.ref, self._device)
            if self._reader.read_layer(layer, dst):
                return True
            LOG.warning("KV of %s: the producer reused a block during layer %d; host path", rid, layer)
        except (RuntimeError, ValueError, OSError, IndexError) as exc:
            LOG.warning("KV of %s: device read of layer %d failed (%s); host path", rid, layer, exc)
        return False

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def close(self) -> None:
        """Ends the device read and the fallback pull; idempotent."""
        self._close_reader()
        self._fallback.close()
