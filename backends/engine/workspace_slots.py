"""Which decode-workspace slot each sequence uses, and which of its tokens are valid there.

Staleness rule (by construction): a sequence's workspace row is trusted only for the tokens
`[0, num_valid)` recorded when a workspace decode step appended its last token, and only while
the sequence's `kv_epoch` is the one recorded then. Its KV changes outside a workspace step
(prefill or mixed steps, KV import, prefix load, preemption/recompute) either advance
`num_computed_tokens` past `num_valid` or bump `kv_epoch`; either way the next workspace step
sees `num_valid != num_computed_tokens` (or a new epoch) and refills the row from the paged
cache, which is written every step and stays the source of truth.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

import numpy as np
import torch

from backends.engine.decode_workspace import DecodeWorkspace, WorkspaceStep
from backends.engine.sequence import SeqStatus, Sequence

_MIN_CAPACITY = 256


@dataclass(slots=True)
class _Entry:
    slot: int
    num_valid: int  # the row holds the sequence's tokens [0, num_valid)
    epoch: int  # the sequence's kv_epoch when those tokens were written


class WorkspaceSlots:
    """Slot allocator and refill planner over one `DecodeWorkspace` (owned by the runner).

    `plan` is called for a decode-only step before the forward; `commit` after it succeeded
    (only then do the appended tokens count as valid).
    """

    def __init__(self, workspace: DecodeWorkspace, *, block_size: int, max_len: int,
                 max_bytes: int) -> None:
        self.workspace = workspace
        self.block_size = block_size
        self.max_len = max_len
        self.max_bytes = max_bytes
        self._entries: dict[Sequence, _Entry] = {}
        self._free = list(range(workspace.rows))
        self._pending: list[tuple[_Entry, int, int]] = []
        self.num_steps = 0  # decode steps planned over the workspace (metrics, tests)
        self.num_refilled_tokens = 0  # tokens copied in from the paged cache
        self.num_mixed_steps = 0  # of those, mixed steps (decodes beside prefill chunks)
        self._reserve(min(max_len, _MIN_CAPACITY))  # typical contexts never regrow mid-decode

    def _release_finished(self) -> None:
        """Free the slots of sequences that stopped running (finished, aborted, preempted)."""
        gone = [s for s in self._entries if s.status is not SeqStatus.RUNNING]
        for seq in gone:
            heapq.heappush(self._free, self._entries.pop(seq).slot)

    def _reserve(self, length: int) -> bool:
        ws = self.workspace
        if length <= ws.capacity_len:
            return True
        # grow geometrically (each growth copies every row): amortized O(1) per token
        target = min(self.max_len, max(2 * length, 2 * ws.capacity_len, _MIN_CAPACITY))
        if ws.bytes_for(target) > self.max_bytes:
            target = length  # no headroom left: exactly what this step needs
            if ws.bytes_for(target) > self.max_bytes:
                return False
        ws.reserve(target)
        return True

    def plan(self, seqs: list[Sequence], positions: list[int], positions_tensor: torch.Tensor,
             *, token_index: torch.Tensor | None = None,
             seq_indices: tuple[int, ...] = ()) -> WorkspaceStep | None:
        """The workspace step for sequences that each compute one token (`positions[i]`: where
        seqs[i]'s new token goes; `positions_tensor` the same on the workspace's device), or
        None (then they read the paged cache). `token_index` / `seq_indices`: see
        `WorkspaceStep` (a mixed step)."""
        self._release_finished()
        self._pending = []
        length = max(positions) + 1
        if len(seqs) > self.workspace.rows or not self._reserve(length):
            return None
        slots: list[int] = []
        refill: list[tuple[int, Sequence, int]] = []
        entries, pending = self._entries, self._pending
        for seq, pos in zip(seqs, positions, strict=True):
            entry = entries.get(seq)
            if entry is None:
                entry = _Entry(heapq.heappop(self._free), 0, seq.kv_epoch)
                entries[seq] = entry
            if entry.num_valid != pos or entry.epoch != seq.kv_epoch:
                refill.append((entry.slot, seq, pos))
            slots.append(entry.slot)
            pending.append((entry, pos + 1, seq.kv_epoch))
        self.num_steps += 1
        self.num_refilled_tokens += sum(num_tokens for _, _, num_tokens in refill)
        step = self._step(slots, positions, positions_tensor, length, refill)
        if token_index is None:
            return step
        self.num_mixed_steps += 1
        return dataclasses.replace(step, token_index=token_index, seq_indices=seq_indices)

    def commit(self) -> None:
        """Record the tokens the last planned step appended as valid."""
        for entry, num_valid, epoch in self._pending:
            entry.num_valid = num_valid
            entry.epoch = epoch
        self._pending = []

    def _step(self, slots: list[int], positions: list[int], positions_tensor: torch.Tensor,
              length: int, refill: list[tuple[int, Sequence, int]]) -> WorkspaceStep:
        batch = len(slots)
        identity = slots[-1] == batch - 1 and slots == list(range(batch))
        num_rows = batch if identity else max(slots) + 1
        bias = None
        if min(positions) + 1 < length:  # rows outside the batch are discarded: no mask
            context = np.full(num_rows, length, dtype=np.int64)
            context[slots] = np.asarray(positions, dtype=np.int64) + 1
            valid = torch.arange(length)[None, :] < torch.from_numpy(context)[:, None]
            bias = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))
            bias = bias.to(device=self.workspace.device, dtype=self.workspace.dtype)[:, None, None, :]
        rows, cache_pos, cache_slots = self._refill_indices(refill)
        ws = self.workspace
        append_index = ws.flat_index(np.asarray(slots, dtype=np.int64),
                                     np.asarray(positions, dtype=np.int64))
        refill_index = None
        if rows is not None and cache_pos is not None:
            refill_index = ws.flat_index(rows, cache_pos)
        device = ws.device
        return WorkspaceStep(
            ws, torch.tensor(slots, dtype=torch.int64, device=device), positions_tensor,
            num_rows, length, identity, bias,
            None if rows is None else torch.from_numpy(rows).to(device),
            None if cache_pos is None else torch.from_numpy(cache_pos).to(device),
            cache_slots, append_index, refill_index,
        )

    def _refill_indices(self, refill: list[tuple[int, Sequence, int]]
                        ) -> tuple[np.ndarray | None, np.ndarray | None, torch.Tensor | None]:
        """(workspace rows, positions, paged-cache flat slots) of every token to copy in."""
        refill = [r for r in refill if r[2] > 0]
        if not refill:
            return None, None, None
        bs = self.block_size
        rows, pos_parts, slot_parts = [], [], []
        for slot, seq, num_tokens in refill:
            table = np.asarray(seq.block_table[: -(-num_tokens // bs)], dtype=np.int64)
            flat = (table[:, None] * bs + np.arange(bs, dtype=np.int64)).reshape(-1)
            slot_parts.append(flat[:num_tokens])
            pos_parts.append(np.arange(num_tokens, dtype=np.int64))
            rows.append(np.full(num_tokens, slot, dtype=np.int64))
        cache_slots = torch.from_numpy(np.concatenate(slot_parts)).to(self.workspace.device)
        return np.concatenate(rows), np.concatenate(pos_parts), cache_slots
