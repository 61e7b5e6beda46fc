"""Append-only decode workspace: each decoding sequence's KV, contiguous, beside the paged cache.

A decode step over the paged cache must gather every sequence's blocks (a copy of the whole
context, every layer, every step). The workspace keeps a per-layer copy of each decoding
sequence's KV in contiguous rows `[rows, *mid, length, *tail]` (one row per workspace slot, in
the layout the model's attention reads), so a decode step only appends its new token and
attends over a view.

Ownership and truth: the paged cache stays the source of truth and is written every step. The
runner (`workspace_slots.WorkspaceSlots`) decides, per step, which slot each sequence uses and
which of its tokens must first be copied in from the paged cache (`WorkspaceStep.refill_*`);
the model only copies, appends and attends as a `WorkspaceStep` says. A model opts in by
exposing `decode_workspace_layout() -> tuple[WorkspaceTensor, ...]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class WorkspaceTensor:
    """One per-layer buffer: shape `[rows, *mid, length, *tail]`."""

    mid: tuple[int, ...]
    tail: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class WorkspaceStep:
    """What one decode forward does with the workspace (built by the runner).

    slots [B] int64: workspace row of each batch row. positions [B] int64: where its new token
    goes (its context length before this step). Attention runs over rows `[0, num_rows)` and
    positions `[0, length)`; `identity` when slots == arange(B) and num_rows == B (no
    permutation). bias [num_rows, 1, 1, length]: 0 for real tokens, -inf past each row's
    context (None when every row sees all `length` positions). refill_rows / refill_positions /
    refill_cache_slots [n] int64 (or None): tokens copied from the paged cache (flat slot
    `block_id * block_size + offset`) into the workspace before the append. append_index /
    refill_index: per buffer, the same targets as rows of the buffer viewed `[-1, *tail]`
    (`DecodeWorkspace.flat_index`), computed once per step for every layer.
    token_index [B] int64 / seq_indices: in a mixed step, the rows of the flattened step and
    the sequences (batch indices) whose single new token runs over the workspace, the other
    sequences reading the paged cache; None / () when the whole step is decode.
    """

    buffers: DecodeWorkspace
    slots: torch.Tensor
    positions: torch.Tensor
    num_rows: int
    length: int
    identity: bool
    bias: torch.Tensor | None
    refill_rows: torch.Tensor | None
    refill_positions: torch.Tensor | None
    refill_cache_slots: torch.Tensor | None
    append_index: tuple[torch.Tensor, ...]
    refill_index: tuple[torch.Tensor, ...] | None
    token_index: torch.Tensor | None = None
    seq_indices: tuple[int, ...] = ()


class DecodeWorkspace:
    """Per-layer buffers `[rows, *mid, capacity_len, *tail]`, grown on demand (content kept).

    Unwritten positions hold zeros or old finite values; readers mask them by context length.
    """

    def __init__(self, num_layers: int, layout: tuple[WorkspaceTensor, ...], rows: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.layout = layout
        self.rows = rows
        self.capacity_len = 0
        self.dtype = dtype
        self.device = device
        self.layers: list[tuple[torch.Tensor, ...]] = [() for _ in range(num_layers)]

    def bytes_for(self, length: int) -> int:
        """Memory of all layers at a capacity of `length` tokens per row."""
        per_token = sum(_numel(t.mid) * _numel(t.tail) for t in self.layout)
        elem = torch.empty((), dtype=self.dtype).element_size()
        return len(self.layers) * self.rows * length * per_token * elem

    def flat_index(self, rows: np.ndarray, positions: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Per buffer: the rows of `buffer.view(-1, *tail)` holding token `positions[i]` of
        workspace row `rows[i]`, every mid index in order (`[n * prod(mid)]` int64). Valid
        until the next `reserve` that grows the buffers."""
        made: dict[int, torch.Tensor] = {}
        out = []
        for spec in self.layout:
            mid = _numel(spec.mid)
            if mid not in made:
                heads = np.arange(mid, dtype=np.int64)
                flat = ((rows[:, None] * mid + heads[None, :]) * self.capacity_len
                        + positions[:, None]).reshape(-1)
                made[mid] = torch.from_numpy(flat).to(self.device)
            out.append(made[mid])
        return tuple(out)

    def reserve(self, length: int) -> None:
        """Make every row hold at least `length` tokens (copies existing content over)."""
        if length <= self.capacity_len:
            return
        old = self.capacity_len
        for i, tensors in enumerate(self.layers):
            grown = []
            for j, spec in enumerate(self.layout):
                shape = (self.rows, *spec.mid, length, *spec.tail)
                new = torch.empty(shape, dtype=self.dtype, device=self.device)
                length_dim = 1 + len(spec.mid)
                if tensors:
                    new.narrow(length_dim, 0, old).copy_(tensors[j])
                new.narrow(length_dim, old, length - old).zero_()
                grown.append(new)
            self.layers[i] = tuple(grown)
        self.capacity_len = length


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def store(buffer: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """Write `values` `[n, *mid, *tail]` at `index` (`[n * prod(mid)]`, from
    `DecodeWorkspace.flat_index`)."""
    if index.numel() == 0:
        return
    tail = values.numel() // index.numel()
    buffer.view(-1, tail).index_copy_(0, index, values.reshape(index.numel(), tail))


def update(step: WorkspaceStep, layer: int, cache: torch.Tensor, new: tuple[torch.Tensor, ...],
           split_rows: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
           ) -> tuple[torch.Tensor, ...]:
    """Refill from `cache` (this layer's paged cache) then append this step's new tokens
    (`new`: one `[B, *mid, *tail]` tensor per buffer; `split_rows` turns cache rows
    `[n, kv_width]` into the same form). Returns the attention views
    `[num_rows, *mid, length, *tail]` of this layer's buffers."""
    ws = step.buffers
    buffers = ws.layers[layer]
    if step.refill_index is not None and step.refill_cache_slots is not None:
        rows = cache.view(-1, cache.shape[-1]).index_select(0, step.refill_cache_slots)
        for buffer, index, values in zip(buffers, step.refill_index, split_rows(rows),
                                         strict=True):
            store(buffer, index, values)
    views = []
    for buffer, spec, index, values in zip(buffers, ws.layout, step.append_index, new,
                                           strict=True):
        store(buffer, index, values)
        views.append(buffer[: step.num_rows].narrow(1 + len(spec.mid), 0, step.length))
    return tuple(views)
