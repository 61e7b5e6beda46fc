"""Layer buffers over memory: pool regions, per-layer arrays, and the copies between them.

A layer is a list of contiguous byte runs (see ``LayerBuffers`` in base.py); the two sides of
a transfer may split it differently, so copies go overlap by overlap. Between two pool
regions of the same block size, ``copy_layers`` copies all requested layers at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from kvbridge.pool import HostBlockPool
from kvbridge.transport.base import LayerBuffers


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
        self._fill(array, slots, int(shape[0]), int(shape[1]), int(shape[2]))

    @classmethod
    def of_pool(cls, pool: HostBlockPool, slots: Sequence[int]) -> PoolRegion:
        """The blocks at ``slots`` of ``pool``; checks only the slots (a pool's array is by
        construction a C-contiguous uint8 [L, S, B] array): the receive path's cheap form."""
        layout = pool.layout
        region = cls.__new__(cls)
        region._fill(pool.array, slots, layout.num_layers, layout.num_slots, layout.block_bytes)
        return region

    def _fill(self, array: np.ndarray, slots: Sequence[int], num_layers: int, num_slots: int,
              block_bytes: int) -> None:
        if not slots or min(slots) < 0 or max(slots) >= num_slots:
            raise ValueError(f"slots: expected slots in [0, {num_slots}), got {list(slots)[:16]}")
        self.array = array
        self.slots = tuple(slots)
        self.num_layers = num_layers
        self.layer_nbytes = len(self.slots) * block_bytes
        self.runs = slot_runs(self.slots)  # (first_slot, count) runs of consecutive slots, in order

    def layer_runs(self, layer: int) -> list[np.ndarray]:
        view = self.array[layer]
        return [view[first:first + count].reshape(-1) for first, count in self.runs]


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
    s_runs, d_runs = src.runs, dst.runs
    if len(s_runs) == 1 and len(d_runs) == 1 and s_runs[0][1] == d_runs[0][1]:  # the common case: one run each
        (s0, count), (d0, _) = s_runs[0], d_runs[0]
        np.copyto(dst.array[first:stop, d0:d0 + count], src.array[first:stop, s0:s0 + count])
        return
    pieces = overlaps([count for _, count in s_runs], [count for _, count in d_runs],
                      "dst: source and destination regions differ in size")
    for si, s_off, di, d_off, take in pieces:
        s0, d0 = s_runs[si][0] + s_off, d_runs[di][0] + d_off
        np.copyto(dst.array[first:stop, d0:d0 + take], src.array[first:stop, s0:s0 + take])
