"""Continuous-batching scheduler with chunked prefill and preemption by recompute.

Each step: running sequences that decode go first (one token each), then running sequences
with prefill left (chunks), then waiting sequences join while the token budget, `max_num_seqs`
and free blocks allow. When a running sequence cannot get a block, the latest-ordered running
sequence not yet scheduled this step is preempted: its blocks are freed and it goes back to the
front of the waiting queue to recompute prompt + outputs. The scheduler decides and accounts
blocks; it never runs the model nor changes `num_computed_tokens` of a scheduled sequence.

KV import (a sequence with a `kv_source`): at admission it gets the blocks its source fills and
an `ImportJob` on the `KVImporter`, and waits in `importing` (WAITING_FOR_KV) while the running
batch keeps stepping; it counts against `max_num_seqs`, not against the token budget. The first
`schedule()` after its job ended moves it to the end of `running` with the imported tokens
computed (or, on failure, frees its blocks and puts it at the front of `waiting` to recompute).
An import still unfinished at its deadline, or whose sequence finishes (abort), is cancelled and
becomes an orphan: its blocks stay reserved until the importer reports the job (its worker no
longer writes them), and are then freed, once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from backends.engine.block_manager import BlockId, BlockManager
from backends.engine.hooks import KVSource
from backends.engine.kv_import import ImportJob, KVImporter
from backends.engine.sequence import SeqStatus, Sequence


class Admission(Protocol):
    """Supplies KV for a sequence's prefix from a local store when it is admitted with nothing
    computed (synchronously, on the step thread: local loads are fast)."""

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
    """This step's work. `imported`: sequences that joined `running` in this call after their
    KV import completed (their imported full blocks are written and not yet reported)."""

    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    num_batched_tokens: int
    imported: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Owns the waiting queue, the importing set and the running list; `block_manager` accounts
    their blocks. Without an `importer`, a `kv_source` is ignored (the prompt is computed)."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        admission: Admission | None = None,
        importer: KVImporter | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.admission = admission
        self.importer = importer
        self.waiting: deque[Sequence] = deque()
        self.importing: dict[Sequence, ImportJob] = {}  # WAITING_FOR_KV, in admission order
        self.running: list[Sequence] = []
        self._orphans: set[ImportJob] = set()  # cancelled imports whose blocks are still held
        self.num_preemptions = 0  # running total, for metrics and tests

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.importing or self.running)

    @property
    def num_orphaned_imports(self) -> int:
        """Cancelled imports whose blocks are freed once their worker lets go of them."""
        return len(self._orphans)

    def wait_for_imports(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` until an import ends; True if one did (for an idle engine)."""
        return self.importer is not None and self.importer.wait(timeout_s)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and token counts; allocate their blocks."""
        imported = self._collect_imports()
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
        used = self.max_num_batched_tokens - budget
        return SchedulerOutput(scheduled, preempted, used, imported)

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
        while self.waiting and len(self.running) + len(self.importing) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.kv_source is not None and self.importer is not None:
                if not self._start_import(seq, seq.kv_source, self.importer):
                    break
                continue  # an import computes nothing this step: no token budget
            if budget <= 0:
                break
            seq.kv_source = None
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

    def _start_import(self, seq: Sequence, source: KVSource, importer: KVImporter) -> bool:
        """Reserve the blocks `source` fills and start reading it; False if they do not fit now.
        The imported tokens stop one short of the sequence so that it samples."""
        bm = self.block_manager
        if not bm.can_allocate(bm.blocks_needed(seq.block_table, source.num_tokens)):
            return False
        bm.append_slots(seq.block_table, source.num_tokens)
        num_tokens = min(source.num_tokens, len(seq) - 1)
        self.importing[seq] = importer.submit(seq.request_id, source, seq.block_table, num_tokens)
        self.waiting.popleft()
        seq.status = SeqStatus.WAITING_FOR_KV
        return True

    def _collect_imports(self) -> list[Sequence]:
        """Ended imports join `running` (or go back to recompute), late ones are abandoned,
        reported orphans free their blocks. Returns the sequences that joined."""
        if self.importer is None or not (self.importing or self._orphans):
            return []
        owners = {job: seq for seq, job in self.importing.items()}
        joined: list[tuple[Sequence, int]] = []
        failed: list[Sequence] = []
        for job in self.importer.poll():
            seq = owners.get(job)
            if seq is None:
                self._free_orphan(job)
                continue
            del self.importing[seq]
            if job.error is None:
                joined.append((seq, job.num_loaded))
            else:
                self.block_manager.free(seq.block_table)
                seq.reset_for_recompute()
                failed.append(seq)
        now = time.monotonic()
        for seq, job in list(self.importing.items()):
            if now >= job.deadline:  # its reader ignores the deadline: stop waiting for it
                self._orphan(seq)
                seq.reset_for_recompute()
                failed.append(seq)
        joined.sort(key=lambda pair: pair[0].arrival_index)
        for seq, num_loaded in joined:
            self._join(seq, num_loaded)
        self.waiting.extendleft(sorted(failed, key=lambda s: s.arrival_index, reverse=True))
        return [seq for seq, _ in joined]

    def _join(self, seq: Sequence, num_loaded: int) -> None:
        seq.kv_source = None
        seq.kv_epoch += 1
        seq.num_computed_tokens = num_loaded
        seq.num_cached_tokens = num_loaded
        seq.num_published_blocks = 0  # the engine reports the imported blocks (`imported`)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def _orphan(self, seq: Sequence) -> None:
        """Cancel `seq`'s import; the job keeps its blocks until the importer reports it."""
        job = self.importing.pop(seq)
        job.cancel()
        self._orphans.add(job)
        seq.block_table = []

    def _free_orphan(self, job: ImportJob) -> None:
        if job not in self._orphans:
            raise RuntimeError(f"import of {job.request_id!r} reported with no owner")
        self._orphans.remove(job)
        self.block_manager.free([BlockId(b) for b in job.block_ids])

    def finish(self, seq: Sequence, *, keep_blocks: bool = False) -> None:
        """Take a sequence out of scheduling; free its blocks unless `keep_blocks`.

        A sequence still importing gives its blocks to the cancelled job (freed once its worker
        stopped), whatever `keep_blocks` says: they hold no complete KV."""
        if seq in self.importing:
            self._orphan(seq)
            seq.status = SeqStatus.FINISHED
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        if not keep_blocks:
            self.block_manager.free(seq.block_table)
            seq.block_table = []
