"""GPU-to-GPU KV on one host: a consumer reads the producer engine's KV cache through CUDA IPC.

The producer shares each layer's cache tensor once (``share_layers``: the CUDA IPC handle of
its storage, offset, shape, stride) and keeps a ``GenerationTable`` in /dev/shm: one counter
per engine block, bumped (on the host) every time the block is handed out, before anything is
written into it. A ``DeviceRef`` names the blocks of one request with their generations when
the ref was made. The consumer (``DeviceReader``, same GPU, another process) copies a layer's
blocks device to device, waits for the copy, and then checks the generations: unchanged means
no writer touched those blocks before the copy ended (a writer bumps first, then queues its
kernels), so the copy is exact; changed means the producer reused a block and the caller must
get that layer elsewhere (the host path). The producer frees blocks to the end of a FIFO list,
so a reuse within a copy's lifetime needs the whole free list to turn over first.

Region names: ``kvb-genpool-g<pgid>-p<pid>-<hex>``, like the worker's pool, so the launcher's
sweeps (``kvb-*pool-g<pgid>-*`` for a stopped server, ``...-p<pid>-*`` for one dead stub) cover a
killed producer's table.
Wire form of a DeviceRef: msgpack of plain types; ``from_bytes`` raises ValueError naming the
field (``device_ref.<field>``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import re
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import torch

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^kvb-genpool-[A-Za-z0-9._-]{1,180}$")
MAX_LAYERS = 4096


def table_name(pgid: int, pid: int) -> str:
    return f"kvb-genpool-g{pgid}-p{pid}-{secrets.token_hex(6)}"


class GenerationTable:
    """``num_blocks`` int64 counters in ``/dev/shm/<name>``; the creator unlinks it on close."""

    def __init__(self, name: str, num_blocks: int, *, create: bool) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"name: expected kvb-genpool-[A-Za-z0-9._-]+, got {name!r}")
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            raise ValueError(f"name: no generation table {name!r} on this host") from None
        try:
            if create:
                os.ftruncate(fd, num_blocks * 8)
            elif os.fstat(fd).st_size != num_blocks * 8:
                raise ValueError(f"num_blocks: table {name!r} holds {os.fstat(fd).st_size // 8}, "
                                 f"expected {num_blocks}")
            self._map = mmap.mmap(fd, num_blocks * 8)
        finally:
            os.close(fd)
        self.name, self.owner = name, create
        self._closed = False
        self.array: np.ndarray = np.frombuffer(self._map, dtype=np.int64)

    def close(self) -> None:
        """Drops the mapping (left to the last view when one is still held, e.g. by a block
        manager) and, for the creator, unlinks the file. Idempotent."""
        if self._map.closed or self._closed:
            return
        self._closed = True
        self.array = np.empty(0, np.int64)
        try:
            self._map.close()
        except BufferError:
            pass
        finally:
            if self.owner:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SHM_DIR, self.name))


def device_uuid(device: torch.device | str) -> str:
    """The GPU's UUID (equal in every process that sees it, whatever its index there)."""
    return str(torch.cuda.get_device_properties(torch.device(device)).uuid)


def share_layers(layers: list[torch.Tensor]) -> list[list[Any]]:
    """Each layer's IPC descriptor: [storage share args (8 plain values), storage offset,
    shape, stride, dtype name]."""
    out = []
    for tensor in layers:
        args = tensor.untyped_storage()._share_cuda_()
        out.append([list(args), tensor.storage_offset(), list(tensor.shape), list(tensor.stride()),
                    str(tensor.dtype).removeprefix("torch.")])
    return out


_OPENED: dict[bytes, torch.UntypedStorage] = {}  # IPC handle -> opened storage (kept open)
_OPEN_LOCK = threading.Lock()


def open_layers(descriptors: list[list[Any]], device: torch.device) -> list[torch.Tensor]:
    """The producer's layer tensors, mapped into this process (each storage opened once)."""
    layers = []
    for args, offset, shape, stride, dtype in descriptors:
        key = bytes(args[1])
        with _OPEN_LOCK:
            storage = _OPENED.get(key)
            if storage is None:  # the producer's device index may differ from ours
                with torch.cuda.device(device):
                    storage = torch.UntypedStorage._new_shared_cuda(
                        torch.cuda.current_device(), *args[1:])
                _OPENED[key] = storage
        view = torch.empty(0, dtype=getattr(torch, dtype), device=device)
        view.set_(storage, offset, shape, stride)
        layers.append(view)
    return layers


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceRef:
    """One request's blocks in a producer's GPU KV cache."""

    device_uuid: str
    layers: list[list[Any]]
    table: str
    table_blocks: int
    block_ids: tuple[int, ...]
    block_gens: tuple[int, ...]

    def to_bytes(self) -> bytes:
        wire = dataclasses.asdict(self)
        wire["block_ids"], wire["block_gens"] = list(self.block_ids), list(self.block_gens)
        return bytes(msgpack.packb(wire, use_bin_type=True))

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceRef:
        try:
            wire = msgpack.unpackb(bytes(data), raw=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ValueError(f"device_ref: undecodable ({exc})") from exc
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(wire, dict) or sorted(wire) != sorted(names):
            raise ValueError(f"device_ref: expected a map with {sorted(names)}, got {wire!r:.120}")
        if not isinstance(wire["device_uuid"], str) or not _NAME_RE.match(str(wire["table"])):
            raise ValueError(f"device_ref.table: expected kvb-genpool-..., got {wire['table']!r:.80}")
        layers = wire["layers"]
        if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS or \
                not all(isinstance(x, list) and len(x) == 5 for x in layers):
            raise ValueError(f"device_ref.layers: expected 1..{MAX_LAYERS} descriptors, got {layers!r:.80}")
        ids, gens, blocks = wire["block_ids"], wire["block_gens"], wire["table_blocks"]
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"device_ref.table_blocks: expected an int >= 1, got {blocks!r:.80}")
        if not isinstance(ids, list) or not all(isinstance(b, int) and 0 <= b < blocks for b in ids):
            raise ValueError(f"device_ref.block_ids: expected ints in [0, {blocks}), got {ids!r:.80}")
        if not isinstance(gens, list) or len(gens) != len(ids) or \
                not all(isinstance(g, int) for g in gens):
            raise ValueError(f"device_ref.block_gens: expected {len(ids)} ints, got {gens!r:.80}")
        return cls(wire["device_uuid"], layers, wire["table"], blocks, tuple(ids), tuple(gens))


class DeviceReader:
    """Copies a DeviceRef's blocks out of the producer's cache, layer by layer (CUDA only)."""

    def __init__(self, ref: DeviceRef, device: torch.device) -> None:
        self.ref = ref
        self._layers = open_layers(ref.layers, device)
        self._table = GenerationTable(ref.table, ref.table_blocks, create=False)
        self._index = torch.tensor(ref.block_ids, dtype=torch.int64, device=device)
        self._gens = np.asarray(ref.block_gens, dtype=np.int64)

    def read_layer(self, layer: int, dst: torch.Tensor) -> bool:
        """Copies layer ``layer``'s blocks into ``dst`` (``[len(block_ids), ...]``) on the current
        stream and waits for it; False when a block was reused meanwhile (``dst`` is then not
        the request's KV)."""
        torch.index_select(self._layers[layer], 0, self._index, out=dst)
        torch.cuda.current_stream(dst.device).synchronize()
        return self.valid()

    def valid(self) -> bool:
        """Every block still has the generation it had when the ref was made."""
        return bool(np.array_equal(self._table.array[list(self.ref.block_ids)], self._gens))

    def close(self) -> None:
        self._table.close()


class DeviceShare:
    """A producer engine's shared cache: its device and UUID, the block generations it keeps in
    a GenerationTable (``block_manager.use_generations``), and its layers' IPC descriptors.
    ``ref(block_ids)`` names blocks for a DeviceRef; ``close()`` unlinks the table."""

    def __init__(self, block_manager: Any, kv_caches: list[torch.Tensor]) -> None:
        self.device = kv_caches[0].device
        self.table = GenerationTable(table_name(os.getpgrp(), os.getpid()), block_manager.num_total_blocks,
                                     create=True)
        try:
            block_manager.use_generations(self.table.array)
            self.uuid = device_uuid(self.device)
            self.layers = share_layers(kv_caches)
        except BaseException:
            self.table.close()
            raise

    def ref(self, block_ids: Sequence[int]) -> bytes:
        """The wire form of a DeviceRef to ``block_ids`` at their current generations."""
        gens = tuple(int(g) for g in self.table.array[list(block_ids)])
        return DeviceRef(self.uuid, self.layers, self.table.name, len(self.table.array),
                         tuple(block_ids), gens).to_bytes()

    def close(self) -> None:
        self.table.close()
