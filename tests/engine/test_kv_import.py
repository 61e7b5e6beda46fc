"""The asynchronous KV import state machine: Scheduler + BlockManager + KVImporter over plain
cache tensors (no model). A sequence with a `kv_source` waits in WAITING_FOR_KV with its blocks
reserved while others are scheduled, joins `running` at the first schedule() after its import
ended, recomputes on failure or deadline, and an aborted import's blocks are freed exactly once,
only after its worker stopped."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
import torch
from kv_import_sources import GatedSource, wait_until

from backends.engine.block_manager import BlockManager
from backends.engine.kv_import import ImportJob, KVImporter
from backends.engine.sampling_params import SamplingParams
from backends.engine.scheduler import Scheduler, SchedulerOutput
from backends.engine.sequence import SeqStatus, Sequence

NUM_BLOCKS, BLOCK_SIZE, WIDTH, NUM_LAYERS = 16, 4, 2, 3


class Rig:
    def __init__(self, *, timeout_s: float = 5.0, max_num_seqs: int = 4, budget: int = 16) -> None:
        self.caches = [torch.zeros(NUM_BLOCKS, BLOCK_SIZE, WIDTH) for _ in range(NUM_LAYERS)]
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        # workers exit after 20 ms idle, so the tests also cover their restarts
        self.importer = KVImporter(self.caches, timeout_s, num_workers=2, idle_exit_s=0.02)
        self.sched = Scheduler(
            self.bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
            importer=self.importer,
        )
        self.arrivals = 0

    def seq(self, rid: str, prompt_len: int, source: GatedSource | None = None) -> Sequence:
        """A request of `prompt_len` prompt tokens plus one prior output token when importing."""
        prior = [7] if source is not None else []
        seq = Sequence(rid, list(range(1, prompt_len + 1)), SamplingParams(),
                       arrival_index=self.arrivals, kv_source=source, prior_output_ids=prior)
        self.arrivals += 1
        self.sched.add(seq)
        return seq

    def rows(self, block_ids: list[int]) -> list[torch.Tensor]:
        return [cache[block_ids] for cache in self.caches]

    def close(self) -> None:
        self.importer.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    yield made
    made.close()


def source_for(
    num_tokens: int, seed: int, *, fail_at: int | None = None, honour_deadline: bool = True
) -> GatedSource:
    gen = torch.Generator().manual_seed(seed)
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    layers = [torch.randn(num_blocks, BLOCK_SIZE, WIDTH, generator=gen) for _ in range(NUM_LAYERS)]
    return GatedSource(num_tokens, layers, fail_at=fail_at, honour_deadline=honour_deadline)


def items(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]


def advance(out: SchedulerOutput) -> None:
    """What the engine does after a step: computed tokens advance, samplers get a token."""
    for item in out.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        if samples:
            item.seq.token_ids.append(9)


def test_import_waits_while_others_step_then_joins_with_its_kv(rig: Rig) -> None:
    src = source_for(10, seed=1)
    a = rig.seq("a", 10, src)  # 11 tokens: 10 imported, the prior output computed
    b = rig.seq("b", 5)
    out = rig.sched.schedule()
    assert items(out) == [("b", 5)] and out.imported == []
    assert (a.status, a.block_table, b.block_table) == (SeqStatus.WAITING_FOR_KV, [0, 1, 2], [3, 4])
    assert rig.bm.num_free_blocks == 11
    advance(out)
    src.open(0)
    wait_until(lambda: src.reads == [0, 1])  # the worker holds layer 1
    for _ in range(3):  # b keeps decoding while a's import is blocked
        out = rig.sched.schedule()
        assert items(out) == [("b", 1)] and out.imported == []
        advance(out)
    assert a.status is SeqStatus.WAITING_FOR_KV
    src.open()
    assert rig.importer.wait(5.0)
    out = rig.sched.schedule()
    assert out.imported == [a]
    assert items(out) == [("b", 1), ("a", 1)]
    assert (a.status, a.num_computed_tokens, a.num_cached_tokens, a.kv_epoch, a.kv_source) == (
        SeqStatus.RUNNING, 10, 10, 1, None)
    for got, want in zip(rig.rows([0, 1, 2]), src.layers, strict=True):
        assert torch.equal(got, want)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3, 4, 5])  # b grew to 9 tokens
    assert rig.bm.num_free_blocks == 10
    rig.bm.check_integrity()


@pytest.mark.parametrize("case", ["fails", "late"])
def test_failed_or_late_import_recomputes_in_fresh_blocks(case: str) -> None:
    rig = Rig(timeout_s=0.2)
    try:
        src = source_for(10, seed=2, fail_at=1 if case == "fails" else None)
        a = rig.seq("a", 10, src)
        assert items(rig.sched.schedule()) == []
        if case == "fails":
            src.open()  # layer 1 raises; a late one raises at its deadline (0.2 s)
        assert rig.importer.wait(5.0)
        out = rig.sched.schedule()
        assert out.imported == []
        assert items(out) == [("a", 11)]  # the whole sequence, as a fresh prompt
        # the free list is FIFO: the import's blocks went back behind the others
        assert (a.status, a.block_table, a.num_computed_tokens, a.num_cached_tokens) == (
            SeqStatus.RUNNING, [3, 4, 5], 0, 0)
        assert (a.kv_epoch, a.kv_source) == (1, None)
        assert (src.reads, src.delivered) == (([0, 1], [0]) if case == "fails" else ([0], []))
        assert rig.bm.num_free_blocks == 13 and rig.sched.num_orphaned_imports == 0
        rig.bm.check_integrity()
    finally:
        rig.close()


def test_reader_ignoring_its_deadline_is_abandoned_and_its_blocks_freed_later() -> None:
    rig = Rig(timeout_s=0.2)
    try:
        src = source_for(10, seed=3, honour_deadline=False)
        a = rig.seq("a", 10, src)
        rig.sched.schedule()
        wait_until(lambda: src.reads == [0])
        time.sleep(0.25)  # past the deadline; the reader is still inside read_layer
        out = rig.sched.schedule()
        assert items(out) == [("a", 11)] and a.block_table == [3, 4, 5]
        assert rig.sched.num_orphaned_imports == 1 and rig.bm.num_free_blocks == 10
        assert [rig.bm.ref_count(b) for b in (0, 1, 2)] == [1, 1, 1]  # still reserved
        src.open()
        assert rig.importer.wait(5.0)
        rig.sched.schedule()
        assert rig.sched.num_orphaned_imports == 0 and rig.bm.num_free_blocks == 13
        assert (src.reads, src.delivered) == ([0], [0])  # read, but cancelled before the write
        assert all(int(torch.count_nonzero(r)) == 0 for r in rig.rows([0, 1, 2]))
        rig.bm.check_integrity()
    finally:
        rig.close()


def test_abort_during_import_frees_its_blocks_once_after_the_reader_stops() -> None:
    rig = Rig(budget=64)
    try:
        src = source_for(10, seed=4)
        a = rig.seq("a", 10, src)
        rig.sched.schedule()
        wait_until(lambda: src.reads == [0])
        rig.sched.finish(a)
        assert (a.status, a.block_table) == (SeqStatus.FINISHED, [])
        assert not rig.sched.has_unfinished() and rig.sched.num_orphaned_imports == 1
        assert rig.bm.num_free_blocks == 13  # still reserved: the worker may write them
        c = rig.seq("c", 52)  # takes every free block, never the reserved ones
        d = rig.seq("d", 4)
        assert items(rig.sched.schedule()) == [("c", 52)]
        assert c.block_table == list(range(3, 16)) and d.status is SeqStatus.WAITING
        src.open()
        assert rig.importer.wait(5.0)
        out = rig.sched.schedule()  # the orphan's blocks are freed, then d gets one of them
        assert items(out) == [("c", 52), ("d", 4)] and d.block_table == [0]
        assert rig.sched.num_orphaned_imports == 0 and rig.bm.num_free_blocks == 2
        assert src.delivered == [0] and all(int(torch.count_nonzero(r)) == 0
                                            for r in rig.rows([0, 1, 2]))
        rig.sched.finish(c)
        rig.sched.finish(d)
        rig.sched.schedule()  # nothing is freed twice
        assert rig.bm.num_free_blocks == NUM_BLOCKS
        rig.bm.check_integrity()
    finally:
        rig.close()


def test_imports_count_against_max_num_seqs_not_the_token_budget() -> None:
    rig = Rig(max_num_seqs=2, budget=4)
    try:
        sources = [source_for(30, seed=5), source_for(6, seed=6)]
        a = rig.seq("a", 30, sources[0])  # 8 blocks, more tokens than the step budget
        b = rig.seq("b", 6, sources[1])
        c = rig.seq("c", 3)
        assert items(rig.sched.schedule()) == []
        assert (a.status, b.status, c.status) == (
            SeqStatus.WAITING_FOR_KV, SeqStatus.WAITING_FOR_KV, SeqStatus.WAITING)
        assert rig.bm.num_free_blocks == NUM_BLOCKS - 8 - 2
        rig.sched.finish(a)
        rig.sched.finish(b)
        assert items(rig.sched.schedule()) == [("c", 3)]
        for src in sources:
            src.open()
        wait_until(lambda: orphans_freed(rig))
        assert rig.bm.num_free_blocks == NUM_BLOCKS - 1
        rig.bm.check_integrity()
    finally:
        rig.close()


def test_an_import_starts_when_the_token_budget_is_spent() -> None:
    rig = Rig(budget=4)
    try:
        p = rig.seq("p", 8)
        a = rig.seq("a", 6, source_for(6, seed=7))
        c = rig.seq("c", 2)
        assert items(rig.sched.schedule()) == [("p", 4)]
        assert (p.block_table, a.block_table, c.block_table) == ([0], [1, 2], [])
        assert (a.status, c.status) == (SeqStatus.WAITING_FOR_KV, SeqStatus.WAITING)
    finally:
        rig.close()


def orphans_freed(rig: Rig) -> bool:
    """Schedule once (which frees reported orphans); True when none is left."""
    rig.sched.schedule()
    return rig.sched.num_orphaned_imports == 0


def test_randomized_imports_against_block_accounting() -> None:
    """Random arrivals, gate openings, failures, deadlines and aborts. After every step: the
    block manager is consistent; every used block belongs to exactly one running or importing
    sequence or one orphaned import; a plain running sequence's blocks hold only what it wrote
    (no import writes into a block it does not hold); an import that joined holds its source's
    KV. At the end every block is free."""
    rng = random.Random(11)
    rig = Rig(timeout_s=0.3, max_num_seqs=6, budget=24)
    sources: dict[str, GatedSource] = {}
    signature: dict[str, float] = {}
    try:
        for step in range(120):
            if step < 80 and rng.random() < 0.3:
                rid = f"s{step}"
                n = rng.randint(2, 18)
                if rng.random() < 0.6:
                    outcome = rng.choice(["ok", "ok", "fail", "late", "stuck"])
                    sources[rid] = source_for(
                        n, seed=step, fail_at=rng.randrange(NUM_LAYERS) if outcome == "fail" else None,
                        honour_deadline=outcome != "stuck")
                    if outcome in ("ok", "fail"):
                        sources[rid].open()
                    rig.seq(rid, n, sources[rid])
                else:
                    rig.seq(rid, n)
            live = [*rig.sched.running, *rig.sched.importing]
            if live and rng.random() < 0.08:
                rig.sched.finish(rng.choice(live))
            if step % 10 == 9:  # "stuck" readers return now and then (and are cancelled)
                for src in sources.values():
                    if not src.honour_deadline:
                        src.open()
            out = rig.sched.schedule()
            for seq in out.imported:
                if seq in out.preempted:  # joined, then preempted for lack of blocks
                    continue
                src = sources[seq.request_id]
                num_blocks = len(src.layers[0])
                for got, want in zip(rig.rows(seq.block_table[:num_blocks]), src.layers,
                                     strict=True):
                    assert torch.equal(got, want)
                signature.pop(seq.request_id, None)
            for item in out.scheduled:
                rid = item.seq.request_id
                if rid not in sources or item.seq.num_cached_tokens == 0:
                    value = signature.setdefault(rid, float(len(signature) + 1))
                    for cache in rig.caches:
                        cache[item.seq.block_table] = value
            advance(out)
            for seq in list(rig.sched.running):
                if seq.num_output_tokens >= 4:
                    rig.sched.finish(seq)
            _check_accounting(rig, signature)
            time.sleep(0.005)
        for src in sources.values():
            src.open()
        deadline = time.monotonic() + 10
        while rig.sched.has_unfinished() or rig.sched.num_orphaned_imports:
            assert time.monotonic() < deadline
            rig.importer.wait(0.05)
            out = rig.sched.schedule()
            advance(out)
            for seq in list(rig.sched.running):
                if seq.num_output_tokens >= 4:
                    rig.sched.finish(seq)
            _check_accounting(rig, signature)
        assert rig.bm.num_free_blocks == NUM_BLOCKS
        rig.bm.check_integrity()
    finally:
        rig.close()


def _check_accounting(rig: Rig, signature: dict[str, float]) -> None:
    rig.bm.check_integrity()
    holders: list[int] = []
    for seq in [*rig.sched.running, *rig.sched.importing]:
        holders += seq.block_table
    for job in rig.sched._orphans:
        holders += job.block_ids
    assert len(holders) == len(set(holders))
    assert len(holders) + rig.bm.num_free_blocks == NUM_BLOCKS
    for seq in rig.sched.running:
        value = signature.get(seq.request_id)
        if value is not None and seq.num_computed_tokens > 0 and seq.num_cached_tokens == 0:
            for cache in rig.caches:
                assert bool((cache[seq.block_table] == value).all()), seq.request_id


def test_importer_errors_and_close() -> None:
    caches = [torch.zeros(4, BLOCK_SIZE, WIDTH)]
    with pytest.raises(ValueError, match=r"^timeout_s must be > 0, got 0$"):
        KVImporter(caches, 0)
    with pytest.raises(ValueError, match=r"^num_workers must be > 0, got 0$"):
        KVImporter(caches, 1.0, num_workers=0)
    importer = KVImporter(caches, 5.0, num_workers=1)
    stuck = GatedSource(4, [torch.ones(1, BLOCK_SIZE, WIDTH)], honour_deadline=False)
    queued = GatedSource(4, [torch.ones(1, BLOCK_SIZE, WIDTH)])
    jobs = [importer.submit("stuck", stuck, [0], 4), importer.submit("queued", queued, [1], 4)]
    wait_until(lambda: stuck.reads == [0])
    start = time.monotonic()
    importer.close(timeout_s=0.2)  # the stuck reader is left behind, cancelled
    assert time.monotonic() - start < 1.0
    assert all(job.cancelled for job in jobs)
    with pytest.raises(RuntimeError, match=r"^submit on a closed KVImporter$"):
        importer.submit("late", queued, [2], 4)
    stuck.open()
    wait_until(lambda: len(importer._finished) == 2)
    assert [(j.request_id, j.num_loaded, j.error) for j in importer.poll()] == [
        ("stuck", 0, "cancelled"), ("queued", 0, "cancelled")]
    assert queued.reads == [] and int(torch.count_nonzero(caches[0])) == 0


def test_idle_workers_exit_and_come_back() -> None:
    caches = [torch.zeros(4, BLOCK_SIZE, WIDTH)]
    importer = KVImporter(caches, 5.0, num_workers=2, idle_exit_s=0.05)
    try:
        assert importer.num_workers_alive == 0  # none before the first import
        import_three(importer, caches)
        wait_until(lambda: importer.num_workers_alive == 0)  # all exited, idle
        caches[0].zero_()
        import_three(importer, caches)  # new workers take the next imports
    finally:
        importer.close()


def import_three(importer: KVImporter, caches: list[torch.Tensor]) -> None:
    sources = [GatedSource(4, [torch.full((1, BLOCK_SIZE, WIDTH), float(i + 1))])
               for i in range(3)]
    jobs = [importer.submit(f"j{i}", src, [i], 4) for i, src in enumerate(sources)]
    assert importer.num_workers_alive == 2  # capped
    for src in sources:
        src.open()
    done: list[ImportJob] = []
    wait_until(lambda: bool(done.extend(importer.poll())) or len(done) == 3)
    assert {j.request_id for j in done} == {"j0", "j1", "j2"}
    assert [(j.num_loaded, j.error) for j in jobs] == [(4, None)] * 3
    assert [float(caches[0][i, 0, 0]) for i in range(3)] == [1.0, 2.0, 3.0]
