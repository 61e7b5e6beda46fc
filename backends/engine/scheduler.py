"""Continuous-batching scheduler with chunked prefill and preemption by recompute.

Each step: running sequences that decode go first (one token each), then running sequences
with prefill left (chunks), then waiting sequences join while the token budget, `max_num_seqs`
and free blocks allow. When a running sequence cannot get a block, the latest-ordered running
sequence not yet scheduled this step is preempted: its blocks are freed and it goes back to the
front of the waiting queue to recompute prompt + outputs. The scheduler decides and accounts
blocks; it never runs the model nor changes `num_computed_tokens` of a scheduled sequence.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from backends.engine.block_manager import BlockManager
from backends.engine.sequence import SeqStatus, Sequence


class Admission(Protocol):
    """Supplies KV for a sequence's prefix when it is admitted with nothing computed."""

    def cached_tokens(self, seq: Sequence) -> int:
        """Tokens of KV it can provide (< len(seq)); no side effects."""
        ...

    def load(self, seq: Sequence, num_tokens: int) -> int:
        """Write KV of the first `num_tokens` into `seq.block_table`; return tokens loaded."""
        ...


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """`num_new_tokens` tokens of `seq`, starting at its `num_computed_tokens`, run this step."""

    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last token, so it samples one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    num_batched_tokens: int


class Scheduler:
    """Owns the waiting queue and the running list; `block_manager` accounts their blocks."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        admission: Admission | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.admission = admission
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # running total, for metrics and tests

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and token counts; allocate their blocks."""
        budget = self.max_num_batched_tokens
        decoding = [len(s.token_ids) - s.num_computed_tokens == 1 for s in self.running]
        order = [s for s, d in zip(self.running, decoding, strict=True) if d]
        order += [s for s, d in zip(self.running, decoding, strict=True) if not d]
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(order) and budget > 0:
            seq = order[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._reserve(seq, num_new, order, preempted):
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                i += 1
        budget = self._admit_waiting(budget, scheduled)
        return SchedulerOutput(scheduled, preempted, self.max_num_batched_tokens - budget)

    def _reserve(
        self,
        seq: Sequence,
        num_new: int,
        order: list[Sequence],
        preempted: list[Sequence],
    ) -> bool:
        """Allocate blocks for `num_new` more tokens, preempting from the end of `order`."""
        bm = self.block_manager
        target = seq.num_computed_tokens + num_new
        if target <= len(seq.block_table) * bm.block_size:
            return True  # room in its last block: nothing to allocate
        while not bm.can_allocate(bm.blocks_needed(seq.block_table, target)):
            victim = order.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        bm.append_slots(seq.block_table, target)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = 0
            if seq.num_computed_tokens == 0 and self.admission is not None:
                cached = self.admission.cached_tokens(seq)
            num_new = min(len(seq) - cached, budget)
            if not bm.can_allocate(bm.blocks_needed(seq.block_table, cached + num_new)):
                break
            bm.append_slots(seq.block_table, cached + num_new)
            if cached and self.admission is not None:
                loaded = self.admission.load(seq, cached)
                seq.kv_epoch += 1
                seq.num_computed_tokens = loaded
                seq.num_cached_tokens = loaded
                capacity = len(seq.block_table) * bm.block_size - loaded
                num_new = min(len(seq) - loaded, budget, capacity)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return budget

    def finish(self, seq: Sequence, *, keep_blocks: bool = False) -> None:
        """Take a sequence out of scheduling; free its blocks unless `keep_blocks`."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        if not keep_blocks:
            self.block_manager.free(seq.block_table)
            seq.block_table = []
