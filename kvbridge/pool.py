"""Block pools: fixed-size KV blocks in POSIX shared memory.

Layout of a host pool (one flat shared-memory file ``/dev/shm/<name>``)::

    [num_layers][num_slots][block_bytes]   (uint8, C order)

so block (layer, slot) starts at ``(layer * num_slots + slot) * block_bytes`` and one layer of
many blocks is one strided region (``pool.layer(i)[slots]``); contiguous slots of one layer
are one contiguous byte range, which the transports copy in a single call.

Ownership: the process that ``create``s a pool owns the file and unlinks it on ``close()``;
processes that ``attach`` from a :class:`PoolHandle` (name + layout, the same on every process
of the host) only unmap. Numpy views (``block``, ``layer``, ``array``) alias the shared memory
without copies and must not outlive ``close()``. Which slots are in use is the business of a
:class:`kvbridge.slots.SlotAllocator` (one per pool, in the owning process).

:class:`DeviceBlockPool` is the CUDA counterpart (same layout in one device tensor); it imports
torch lazily and refuses to build without CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import mmap
import os
import re
import secrets
from typing import Any

import numpy as np

from kvbridge.protocol import record

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


@record
@dataclasses.dataclass(frozen=True, slots=True)
class PoolLayout:
    num_layers: int
    num_slots: int
    block_bytes: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_slots", "block_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.num_slots * self.block_bytes


@record
@dataclasses.dataclass(frozen=True, slots=True)
class PoolHandle:
    """What another process on the same host needs to map a pool."""

    name: str
    layout: PoolLayout

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"name: expected [A-Za-z0-9._-]{{1,200}}, got {self.name!r}")


class HostBlockPool:
    """A host pool in shared memory; see the module docstring for layout and ownership."""

    def __init__(self, handle: PoolHandle, fd: int, owner: bool) -> None:
        self.handle = handle
        self.owner = owner
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(fd, handle.layout.total_bytes)
        finally:
            os.close(fd)
        layout = handle.layout
        self.array: np.ndarray = np.frombuffer(self._mmap, dtype=np.uint8).reshape(
            layout.num_layers, layout.num_slots, layout.block_bytes
        )

    @classmethod
    def create(cls, layout: PoolLayout, name: str | None = None) -> HostBlockPool:
        """Creates (exclusively) and owns a new zero-filled pool."""
        handle = PoolHandle(name or f"kvb-pool-{secrets.token_hex(8)}", layout)
        fd = os.open(os.path.join(SHM_DIR, handle.name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, layout.total_bytes)
        except OSError:
            os.close(fd)
            os.unlink(os.path.join(SHM_DIR, handle.name))
            raise
        return cls(handle, fd, owner=True)

    @classmethod
    def attach(cls, handle: PoolHandle) -> HostBlockPool:
        """Maps an existing pool of this host; ValueError if its size disagrees with the layout."""
        path = os.path.join(SHM_DIR, handle.name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise ValueError(f"handle.name: no shared-memory pool {handle.name!r} on this host") from None
        size = os.fstat(fd).st_size
        if size != handle.layout.total_bytes:
            os.close(fd)
            raise ValueError(
                f"handle.layout: pool {handle.name!r} has {size} bytes, layout needs {handle.layout.total_bytes}"
            )
        return cls(handle, fd, owner=False)

    @property
    def layout(self) -> PoolLayout:
        return self.handle.layout

    def block(self, layer: int, slot: int) -> np.ndarray:
        """The bytes of block (layer, slot): a view, no copy."""
        self._check(layer, slot)
        return self.array[layer, slot]

    def layer(self, layer: int) -> np.ndarray:
        """All slots of one layer, [num_slots, block_bytes]: a view, no copy."""
        self._check(layer, 0)
        return self.array[layer]

    def _check(self, layer: int, slot: int) -> None:
        if self._mmap is None:
            raise RuntimeError(f"pool {self.handle.name!r} is closed")
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer: {layer} out of range [0, {self.layout.num_layers})")
        if not 0 <= slot < self.layout.num_slots:
            raise ValueError(f"slot: {slot} out of range [0, {self.layout.num_slots})")

    def close(self) -> None:
        """Unmaps; the owner also unlinks. Idempotent. Views taken earlier must be dropped first."""
        if self._mmap is None:
            return
        self.array = np.empty((0, 0, 0), dtype=np.uint8)
        mm, self._mmap = self._mmap, None
        try:
            try:
                mm.close()
            except BufferError:
                gc.collect()  # views kept alive only by garbage cycles (e.g. stored tracebacks)
                mm.close()
        except BufferError as exc:
            raise RuntimeError(f"pool {self.handle.name!r} closed while numpy views still reference it") from exc
        finally:
            if self.owner:
                _unlink_quietly(self.handle.name)

    def __enter__(self) -> HostBlockPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink_quietly(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class DeviceBlockPool:
    """A CUDA pool with the host pool's layout, [num_layers, num_slots, block_bytes] uint8."""

    def __init__(self, layout: PoolLayout, device: str = "cuda") -> None:
        if not cuda_available():
            raise RuntimeError("DeviceBlockPool needs CUDA, which is not available here")
        import torch

        self.layout = layout
        self.tensor: Any = torch.zeros(
            (layout.num_layers, layout.num_slots, layout.block_bytes), dtype=torch.uint8, device=device
        )

    def block(self, layer: int, slot: int) -> Any:
        return self.tensor[layer, slot]

    def layer(self, layer: int) -> Any:
        return self.tensor[layer]

    def close(self) -> None:
        self.tensor = None
