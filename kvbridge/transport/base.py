"""The transport interface: move a multi-layer KV payload layer by layer.

A payload is ``num_layers`` layers of ``layer_nbytes`` bytes each. On either side a layer is
a list of contiguous byte *runs* (e.g. the blocks of one layer at some pool slots, adjacent
slots merged), described by :class:`LayerBuffers`; the two sides may split a layer
differently. The producer calls ``start_send`` and then ``publish_layer(i)`` as soon as layer
i's KV is written (layers in order), so layer i travels while layer i+1 is computed; the
consumer's ``start_recv`` handle lets it wait for layer i alone (``wait_layer``) or all.

Ownership: the transport reads the source runs from ``publish_layer(i)`` until the send
handle is closed, and writes the destination runs until the receive handle is closed; when
``pins`` is given, the source slots are pinned from ``start_send`` to ``close()``. Deadlines
are absolute ``time.monotonic()`` values; a wait past its deadline raises TransferTimeout and
every handle's ``close()`` releases what it holds (idempotent).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

import numpy as np

from kvbridge.pool import HostBlockPool, PoolHandle, SlotAllocator


class LayerBuffers(Protocol):
    num_layers: int
    layer_nbytes: int

    def layer_runs(self, layer: int) -> list[np.ndarray]:
        """Contiguous 1-D uint8 views (no copies) covering the layer in order."""
        ...


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """Merges slots into (first_slot, count) runs of consecutive slots, in the given order."""
    runs: list[tuple[int, int]] = []
    for slot in slots:
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slot, 1))
    return runs


class PoolRegion:
    """The blocks at ``slots`` of a pool array [num_layers, num_slots, block_bytes] (uint8)."""

    def __init__(self, array: np.ndarray, slots: Sequence[int]) -> None:
        shape = array.shape
        if len(shape) != 3 or array.dtype != np.uint8 or not array.flags.c_contiguous:
            raise ValueError(f"array: expected a C-contiguous uint8 [L, S, B] array, got {array.dtype} {shape}")
        if not slots or min(slots) < 0 or max(slots) >= shape[1]:
            raise ValueError(f"slots: expected slots in [0, {shape[1]}), got {list(slots)[:16]}")
        self.array = array
        self.slots = tuple(slots)
        self.num_layers = int(shape[0])
        self.layer_nbytes = len(self.slots) * int(shape[2])
        self._runs = slot_runs(self.slots)

    @classmethod
    def of_pool(cls, pool: HostBlockPool, slots: Sequence[int]) -> PoolRegion:
        """The blocks at ``slots`` of ``pool``; checks only the slots (a pool's array is by
        construction a C-contiguous uint8 [L, S, B] array): the receive path's cheap form."""
        layout = pool.layout
        if not slots or min(slots) < 0 or max(slots) >= layout.num_slots:
            raise ValueError(f"slots: expected slots in [0, {layout.num_slots}), got {list(slots)[:16]}")
        region = cls.__new__(cls)
        region.array = pool.array
        region.slots = tuple(slots)
        region.num_layers = layout.num_layers
        region.layer_nbytes = len(region.slots) * layout.block_bytes
        region._runs = slot_runs(region.slots)
        return region

    def layer_runs(self, layer: int) -> list[np.ndarray]:
        view = self.array[layer]
        return [view[first:first + count].reshape(-1) for first, count in self._runs]

    @property
    def runs(self) -> list[tuple[int, int]]:
        """(first_slot, count) runs of consecutive slots, in order."""
        return list(self._runs)


class ArrayLayers:
    """Per-layer arrays of any dtype (each C-contiguous), seen as bytes; e.g. one [n, bs, w] per layer."""

    def __init__(self, layers: Sequence[np.ndarray]) -> None:
        if not layers:
            raise ValueError("layers: expected at least one layer")
        flat = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in layers]
        for i, (orig, view) in enumerate(zip(layers, flat, strict=True)):
            if not np.shares_memory(orig, view):
                raise ValueError(f"layers[{i}]: must be C-contiguous (a copy would hide the writes)")
            if view.nbytes != flat[0].nbytes:
                raise ValueError(f"layers[{i}]: {view.nbytes} bytes, layer 0 has {flat[0].nbytes}")
        self._flat = flat
        self.num_layers = len(flat)
        self.layer_nbytes = int(flat[0].nbytes)

    def layer_runs(self, layer: int) -> list[np.ndarray]:
        return [self._flat[layer]]


def piece_views(runs: Sequence[np.ndarray], offset: int, nbytes: int) -> list[memoryview]:
    """Memoryviews of bytes [offset, offset + nbytes) of a layer split into ``runs``."""
    views: list[memoryview] = []
    for run in runs:
        size = run.nbytes
        if offset >= size:
            offset -= size
            continue
        take = min(size - offset, nbytes)
        views.append(run[offset:offset + take].data)
        nbytes -= take
        offset = 0
        if nbytes == 0:
            break
    if nbytes:
        raise ValueError(f"nbytes: {nbytes} bytes past the end of the layer")
    return views


def span_views(buffers: LayerBuffers, pos: int, nbytes: int) -> list[memoryview]:
    """Memoryviews of bytes [pos, pos + nbytes) of the whole payload (layers back to back)."""
    views: list[memoryview] = []
    layer, offset = divmod(pos, buffers.layer_nbytes)
    while nbytes > 0:
        if layer >= buffers.num_layers:
            raise ValueError(f"nbytes: {nbytes} bytes past the end of the payload")
        take = min(buffers.layer_nbytes - offset, nbytes)
        views += piece_views(buffers.layer_runs(layer), offset, take)
        nbytes -= take
        layer, offset = layer + 1, 0
    return views


class Overlap(NamedTuple):
    """Where two splits of the same bytes overlap: a run and offset on each side, and the length."""

    a_run: int
    a_offset: int
    b_run: int
    b_offset: int
    nbytes: int


def overlaps(a_sizes: Sequence[int], b_sizes: Sequence[int], mismatch: str) -> list[Overlap]:
    """The pieces, in order, covering bytes split into runs of ``a_sizes`` and of ``b_sizes``.

    ValueError(``mismatch``) when the two splits differ in total size.
    """
    pieces: list[Overlap] = []
    ai = bi = a_off = b_off = 0
    while ai < len(a_sizes) and bi < len(b_sizes):
        take = min(a_sizes[ai] - a_off, b_sizes[bi] - b_off)
        pieces.append(Overlap(ai, a_off, bi, b_off, take))
        a_off += take
        b_off += take
        if a_off == a_sizes[ai]:
            ai, a_off = ai + 1, 0
        if b_off == b_sizes[bi]:
            bi, b_off = bi + 1, 0
    if ai != len(a_sizes) or bi != len(b_sizes):
        raise ValueError(mismatch)
    return pieces


def copy_runs(src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> None:
    """Copies a layer from ``src`` runs into ``dst`` runs (same total), one memcpy per overlap."""
    pieces = overlaps([run.nbytes for run in src], [run.nbytes for run in dst],
                      "dst: source and destination layers differ in size")
    for si, s_off, di, d_off, take in pieces:
        np.copyto(dst[di][d_off:d_off + take], src[si][s_off:s_off + take])


def copy_layers(src: LayerBuffers, dst: LayerBuffers, first: int, stop: int) -> None:
    """Copies layers [first, stop) from ``src`` to ``dst``.

    Between two pool regions of the same block size this is one numpy copy per overlap of
    their slot runs, covering all those layers at once (a strided [layers, blocks] copy), so
    the Python cost does not grow with the number of layers; otherwise one layer at a time.
    A size mismatch raises ValueError before anything is copied.
    """
    if not (isinstance(src, PoolRegion) and isinstance(dst, PoolRegion)
            and src.array.shape[2] == dst.array.shape[2]):
        for layer in range(first, stop):
            copy_runs(src.layer_runs(layer), dst.layer_runs(layer))
        return
    s_runs, d_runs = src._runs, dst._runs
    if len(s_runs) == 1 and len(d_runs) == 1 and s_runs[0][1] == d_runs[0][1]:  # the common case: one run each
        (s0, count), (d0, _) = s_runs[0], d_runs[0]
        np.copyto(dst.array[first:stop, d0:d0 + count], src.array[first:stop, s0:s0 + count])
        return
    pieces = overlaps([count for _, count in s_runs], [count for _, count in d_runs],
                      "dst: source and destination regions differ in size")
    for si, s_off, di, d_off, take in pieces:
        s0, d0 = s_runs[si][0] + s_off, d_runs[di][0] + d_off
        np.copyto(dst.array[first:stop, d0:d0 + take], src.array[first:stop, s0:s0 + take])


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """What the consumer needs to receive one transfer (the producer fills it in).

    ``endpoint`` ("host:port") is the producer's block server (tcp); ``pool`` the producer's
    shared-memory pool (shm). ``source_slots`` are the producer's slots; with an empty
    ``transfer_id`` a tcp receiver pulls those (already written) slots from the pool the
    block server serves, instead of a published transfer; ``pool_name`` then names the
    pool those slots belong to (the server refuses a pull or pin of another pool), and
    ``source_gens`` (from a KV handle's ``block_gens``, one per source slot) their generations:
    the server then pins only slots that still have them and answers a stale pull with
    ErrorReply("stale"). A pull by slots must carry them; a published transfer has none.
    """

    transfer_id: str
    num_layers: int
    layer_nbytes: int
    endpoint: str = ""
    pool: PoolHandle | None = None
    source_slots: tuple[int, ...] = ()
    pool_name: str = ""
    source_gens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.transfer_id) > 200 or not all(c.isalnum() or c in "._-" for c in self.transfer_id):
            raise ValueError(f"transfer_id: expected [A-Za-z0-9._-]{{0,200}}, got {self.transfer_id!r}")
        if self.num_layers < 1 or self.layer_nbytes < 1:
            raise ValueError(f"num_layers/layer_nbytes: expected >= 1, got {self.num_layers}/{self.layer_nbytes}")
        pull_by_slots = not self.transfer_id and bool(self.source_slots)
        if (pull_by_slots or self.source_gens) and len(self.source_gens) != len(self.source_slots):
            raise ValueError(f"source_gens: expected {len(self.source_slots)} generations (one per source slot), "
                             f"got {len(self.source_gens)}")

    def check_buffers(self, buffers: LayerBuffers, side: str) -> None:
        if (buffers.num_layers, buffers.layer_nbytes) != (self.num_layers, self.layer_nbytes):
            raise ValueError(
                f"{side}: buffers hold {buffers.num_layers} layers x {buffers.layer_nbytes} bytes, "
                f"spec says {self.num_layers} x {self.layer_nbytes}"
            )


def check_next_layer(layer: int, published: int, num_layers: int) -> None:
    """ValueError unless ``layer`` is the next to publish after ``published`` of ``num_layers``."""
    if layer != published or layer >= num_layers:
        raise ValueError(f"layer: expected to publish layer {published} next, got {layer}")


class SlotPins:
    """Keeps ``slots`` pinned in ``pins`` (when given) from construction to ``release()`` (idempotent)."""

    __slots__ = ("_pins", "_slots")

    def __init__(self, pins: SlotAllocator | None, slots: tuple[int, ...]) -> None:
        self._slots = slots
        self._pins = pins
        if pins is not None:
            pins.pin(slots)

    def release(self) -> None:
        pins, self._pins = self._pins, None
        if pins is not None:
            pins.unpin(self._slots)


class SendHandle(ABC):
    @abstractmethod
    def publish_layer(self, layer: int) -> None:
        """Layer ``layer`` (the next in order) is written and may be sent."""

    @abstractmethod
    def poll(self) -> int:
        """Layers the consumer has received so far (non-blocking)."""

    @abstractmethod
    def wait(self, deadline: float) -> None:
        """Blocks until the consumer has every layer; TransferTimeout past ``deadline``."""

    @abstractmethod
    def close(self) -> None:
        """Ends the transfer (aborting it if unfinished) and releases pins. Idempotent."""


class RecvHandle(ABC):
    @abstractmethod
    def poll(self) -> int:
        """Layers complete in the destination so far (non-blocking)."""

    @abstractmethod
    def wait_layer(self, layer: int, deadline: float) -> None:
        """Blocks until layers 0..``layer`` are in the destination."""

    def wait(self, deadline: float) -> None:
        self.wait_layer(self.num_layers - 1, deadline)

    num_layers: int

    @abstractmethod
    def close(self) -> None:
        """Stops writing into the destination and releases the connection. Idempotent."""


class Transport(ABC):
    name: ClassVar[str]

    @abstractmethod
    def start_send(self, spec: TransferSpec, source: LayerBuffers, pins: SlotAllocator | None = None) -> SendHandle:
        ...

    @abstractmethod
    def start_recv(self, spec: TransferSpec, dest: LayerBuffers) -> RecvHandle:
        ...

    @abstractmethod
    def close(self) -> None:
        ...


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (monotonic), never negative."""
    return max(0.0, deadline - time.monotonic())


def wait_until(ready: Callable[[], bool], deadline: float) -> bool:
    """Polls ``ready`` with a short exponential backoff (20 us .. 1 ms) until the deadline."""
    pause = 2e-5
    while not ready():
        if time.monotonic() >= deadline:
            return ready()
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
    return True
