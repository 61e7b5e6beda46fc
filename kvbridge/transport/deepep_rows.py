"""The deepep transport's pure part: a KV layer as DeepEP "tokens" (rows), and back.

DeepEP moves MoE tokens, rows of a ``[num_tokens, hidden]`` bf16 matrix, between the ranks of a
process group (``deep_ep/buffer.py``, ``Buffer.dispatch``: ``x`` must be bf16 or an fp8 pair).
Its kernels copy a row as 16-byte (int4) vectors and stage one row per warp in shared memory
(``csrc/deep_ep.cpp``, ``Buffer::intranode_dispatch`` asserts ``hidden * element_size % 16 == 0``;
``csrc/kernels/intranode.cu``, ``dispatch`` asserts ``hidden_bytes + 8 <= kNumTMABytesPerWarp``,
8 or 16 KiB depending on the release). So a layer travels as:

* the layer's bytes (its runs back to back) cut into ``num_rows`` rows of ``row_bytes`` (a multiple
  of 16, at most :data:`MAX_ROW_BYTES`), the last row zero-padded;
* each row followed by a 16-byte tag: little-endian u64 row index, then u64 ``key << 32 | layer``
  (``key``: :func:`transfer_key` of the transfer id), so a receiver places rows by the index the
  row itself carries (DeepEP groups received rows by source rank, and its internode handle holds
  an opaque ``recv_src_meta`` rather than source indices) and refuses rows of another layer or
  transfer;
* the whole ``[num_rows, row_bytes + 16]`` uint8 matrix reinterpreted as bf16 (``.view``, no
  conversion: every KV dtype survives bit for bit);
* every row routed to the consumer by using one "expert" per rank: ``num_experts = world_size``,
  top-1, ``topk_idx = dest_rank``, weight 1 (:func:`routing`).

Nothing here imports deep_ep or needs a GPU; tests check all of it on CPU, exactly.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvbridge.errors import ProtocolError

ROW_ALIGN = 16
TAG_BYTES = 16
# row + tag + the 8-byte mbarrier fit the smallest per-warp TMA buffer (8 KiB) of any release
MAX_ROW_BYTES = 8192 - 16 - TAG_BYTES
ENDPOINT_PREFIX = "deepep:"


@dataclass(frozen=True, slots=True)
class RowLayout:
    """How one layer of ``layer_nbytes`` is cut into ``num_rows`` rows of ``row_bytes`` data bytes."""

    layer_nbytes: int
    row_bytes: int

    def __post_init__(self) -> None:
        if self.layer_nbytes < 1:
            raise ValueError(f"layer_nbytes: expected >= 1, got {self.layer_nbytes}")
        if not ROW_ALIGN <= self.row_bytes <= MAX_ROW_BYTES or self.row_bytes % ROW_ALIGN:
            raise ValueError(f"row_bytes: expected a multiple of {ROW_ALIGN} in "
                             f"[{ROW_ALIGN}, {MAX_ROW_BYTES}], got {self.row_bytes}")

    @classmethod
    def for_layer(cls, layer_nbytes: int, max_row_bytes: int = MAX_ROW_BYTES) -> RowLayout:
        """The fewest rows of at most ``max_row_bytes``, as even as 16-byte alignment allows.

        Depends only on its arguments, so producer and consumer derive the same layout (DeepEP
        needs the same ``hidden`` on every rank of a dispatch).
        """
        if not ROW_ALIGN <= max_row_bytes <= MAX_ROW_BYTES or max_row_bytes % ROW_ALIGN:
            raise ValueError(f"max_row_bytes: expected a multiple of {ROW_ALIGN} in "
                             f"[{ROW_ALIGN}, {MAX_ROW_BYTES}], got {max_row_bytes}")
        if layer_nbytes < 1:
            raise ValueError(f"layer_nbytes: expected >= 1, got {layer_nbytes}")
        num_rows = -(-layer_nbytes // max_row_bytes)
        per_row = -(-layer_nbytes // num_rows)
        return cls(layer_nbytes, -(-per_row // ROW_ALIGN) * ROW_ALIGN)

    @property
    def num_rows(self) -> int:
        return -(-self.layer_nbytes // self.row_bytes)

    @property
    def hidden(self) -> int:
        """bf16 elements per row (data and tag): DeepEP's ``hidden``."""
        return (self.row_bytes + TAG_BYTES) // 2


def transfer_key(transfer_id: str) -> int:
    """32-bit key of a transfer id carried in every row's tag (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(transfer_id.encode())


def _check_runs(runs: Sequence[np.ndarray], name: str) -> int:
    """Total bytes of ``runs``; ValueError unless each is a C-contiguous 1-D uint8 array."""
    for i, run in enumerate(runs):
        if run.dtype != np.uint8 or run.ndim != 1 or not run.flags.c_contiguous:
            raise ValueError(f"{name}[{i}]: expected a contiguous 1-D uint8 array, got {run.dtype} {run.shape}")
    return sum(int(run.nbytes) for run in runs)


def _tag_words(rows_u8: np.ndarray, row_bytes: int) -> np.ndarray:
    tags: np.ndarray = rows_u8[:, row_bytes:].view("<u8")
    return tags


def pack_layer(runs: Sequence[np.ndarray], layout: RowLayout, *, layer: int = 0, key: int = 0) -> torch.Tensor:
    """A new CPU ``[num_rows, hidden]`` bf16 tensor holding the layer's bytes and each row's tag.

    ``runs`` are the layer's contiguous 1-D uint8 pieces in order; they must sum to
    ``layout.layer_nbytes`` (ValueError otherwise). Does not modify ``runs``.
    """
    total = _check_runs(runs, "runs")
    if total != layout.layer_nbytes:
        raise ValueError(f"runs: {total} bytes, layout says {layout.layer_nbytes}")
    if not 0 <= layer < 2**32 or not 0 <= key < 2**32:
        raise ValueError(f"layer/key: expected 32-bit unsigned values, got {layer}/{key}")
    n, rb = layout.num_rows, layout.row_bytes
    out = np.empty((n, rb + TAG_BYTES), dtype=np.uint8)
    flat = np.zeros(n * rb, dtype=np.uint8)
    offset = 0
    for run in runs:
        flat[offset:offset + run.nbytes] = run
        offset += run.nbytes
    out[:, :rb] = flat.reshape(n, rb)
    tags = _tag_words(out, rb)
    tags[:, 0] = np.arange(n, dtype=np.uint64)
    tags[:, 1] = np.uint64(key << 32 | layer)
    return torch.from_numpy(out).view(torch.bfloat16)


def _as_bytes(rows: torch.Tensor | np.ndarray) -> np.ndarray:
    """``rows`` ([n, hidden] bf16 tensor or [n, row_bytes + tag] uint8 array) as uint8 numpy."""
    if isinstance(rows, torch.Tensor):
        if rows.dtype != torch.bfloat16 or rows.dim() != 2 or rows.device.type != "cpu":
            raise ValueError(f"rows: expected a CPU [n, hidden] bf16 tensor, got {rows.dtype} "
                             f"{tuple(rows.shape)} on {rows.device}")
        arr: np.ndarray = rows.contiguous().view(torch.uint8).numpy()
        return arr
    if rows.dtype != np.uint8 or rows.ndim != 2:
        raise ValueError(f"rows: expected a [n, bytes] uint8 array, got {rows.dtype} {rows.shape}")
    return rows


def read_tags(rows: torch.Tensor | np.ndarray, layout: RowLayout, *, layer: int, key: int) -> np.ndarray:
    """The source row index of every received row, checked against what was expected.

    ProtocolError (a wire fault, not a caller mistake) when the row count or width differs from
    ``layout``, a tag names another layer or transfer, or the indices are not a permutation of
    ``range(num_rows)``.
    """
    arr = _as_bytes(rows)
    n, rb = layout.num_rows, layout.row_bytes
    if arr.shape != (n, rb + TAG_BYTES):
        raise ProtocolError(f"deepep rows: got {arr.shape[0]} rows of {arr.shape[1]} bytes, "
                            f"expected {n} of {rb + TAG_BYTES} for layer {layer}")
    tags = _tag_words(arr, rb)
    expected = np.uint64(key << 32 | layer)
    wrong = np.flatnonzero(tags[:, 1] != expected)
    if wrong.size:
        got = int(tags[wrong[0], 1])
        raise ProtocolError(f"deepep rows: row {int(wrong[0])} is of transfer key {got >> 32} layer "
                            f"{got & 0xFFFFFFFF}, expected key {key} layer {layer}")
    index = tags[:, 0].astype(np.int64)
    if not np.array_equal(np.sort(index), np.arange(n)):
        raise ProtocolError(f"deepep rows: row indices of layer {layer} are not a permutation of 0..{n - 1}")
    return index


def unpack_rows(rows: torch.Tensor | np.ndarray, src_index: Sequence[int] | np.ndarray,
                dest_runs: Sequence[np.ndarray], layer_nbytes: int) -> None:
    """Writes the layer carried by ``rows`` into ``dest_runs``; row k is source row ``src_index[k]``.

    The destination may split the layer differently from the source; padding is dropped.
    ValueError naming the argument when sizes or indices do not fit; ``dest_runs`` are untouched
    then.
    """
    arr = _as_bytes(rows)
    rb = arr.shape[1] - TAG_BYTES
    layout = RowLayout(layer_nbytes, rb)
    index = np.asarray(src_index, dtype=np.int64)
    if arr.shape[0] != layout.num_rows or index.shape != (layout.num_rows,):
        raise ValueError(f"rows/src_index: {arr.shape[0]} rows and {index.size} indices, a "
                         f"{layer_nbytes}-byte layer of {rb}-byte rows has {layout.num_rows}")
    if not np.array_equal(np.sort(index), np.arange(layout.num_rows)):
        raise ValueError(f"src_index: expected a permutation of 0..{layout.num_rows - 1}, "
                         f"got {index[:16].tolist()}")
    total = _check_runs(dest_runs, "dest_runs")
    if total != layer_nbytes:
        raise ValueError(f"dest_runs: {total} bytes, layer_nbytes is {layer_nbytes}")
    ordered = np.empty((layout.num_rows, rb), dtype=np.uint8)
    ordered[index] = arr[:, :rb]
    flat = ordered.reshape(-1)
    offset = 0
    for run in dest_runs:
        run[:] = flat[offset:offset + run.nbytes]
        offset += run.nbytes


def routing(num_rows: int, dest_rank: int | None, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_idx`` [num_rows, 1] int64 and ``topk_weights`` [num_rows, 1] float32 (CPU).

    One expert per rank: every row goes to expert ``dest_rank``, i.e. to that rank, weight 1.
    ``dest_rank=None`` routes the rows nowhere (-1, weight 0): what a rank that only receives
    passes, one row, since some DeepEP builds refuse empty (null-pointer) inputs.
    """
    if num_rows < 1:
        raise ValueError(f"num_rows: expected >= 1, got {num_rows}")
    if world_size < 2:
        raise ValueError(f"world_size: expected >= 2, got {world_size}")
    if dest_rank is not None and not 0 <= dest_rank < world_size:
        raise ValueError(f"dest_rank: expected a rank in [0, {world_size}), got {dest_rank}")
    target, weight = (-1, 0.0) if dest_rank is None else (dest_rank, 1.0)
    return (torch.full((num_rows, 1), target, dtype=torch.int64),
            torch.full((num_rows, 1), weight, dtype=torch.float32))


def format_endpoint(producer_rank: int, consumer_rank: int) -> str:
    """``"deepep:<producer>:<consumer>"``, ranks within the transport's process group."""
    return f"{ENDPOINT_PREFIX}{producer_rank}:{consumer_rank}"


def parse_endpoint(endpoint: str, world_size: int) -> tuple[int, int]:
    """(producer_rank, consumer_rank) of a ``"deepep:<producer>:<consumer>"`` endpoint.

    ValueError naming ``endpoint`` unless both are distinct ranks in ``[0, world_size)``.
    """
    body = endpoint[len(ENDPOINT_PREFIX):] if endpoint.startswith(ENDPOINT_PREFIX) else ""
    parts = body.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"endpoint: expected 'deepep:<producer rank>:<consumer rank>', got {endpoint!r}")
    producer, consumer = int(parts[0]), int(parts[1])
    if producer == consumer or max(producer, consumer) >= world_size:
        raise ValueError(f"endpoint: expected two distinct ranks in [0, {world_size}), got {endpoint!r}")
    return producer, consumer
