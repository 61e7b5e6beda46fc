"""Scheduler with a deterministic stand-in for the model: next token = f(all tokens so far).

The scheduler is the thing under test; the stand-in only consumes its decisions exactly as the
engine does (advance num_computed_tokens, append a token when the last token was computed).
"""

from __future__ import annotations

from backends.engine.block_manager import BlockManager
from backends.engine.sampling_params import SamplingParams
from backends.engine.scheduler import Scheduler, SchedulerOutput
from backends.engine.sequence import Sequence


def next_token(tokens: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 31 + len(tokens)) % 97


def apply(out: SchedulerOutput, sched: Scheduler, max_tokens: int) -> list[str]:
    finished = []
    for item in out.scheduled:
        seq = item.seq
        assert len(seq.block_table) * sched.block_manager.block_size >= (
            seq.num_computed_tokens + item.num_new_tokens
        )
        samples = item.samples
        seq.num_computed_tokens += item.num_new_tokens
        if samples:
            seq.token_ids.append(next_token(seq.token_ids))
            if seq.num_output_tokens == max_tokens:
                sched.finish(seq)
                finished.append(seq.request_id)
    return finished


def run(
    prompts: dict[int, list[int]],
    *,
    num_blocks: int,
    budget: int,
    max_tokens: int = 6,
    max_num_seqs: int = 8,
) -> tuple[dict[str, list[int]], list[SchedulerOutput]]:
    """`prompts` maps arrival step -> prompt; returns outputs per request and the step log."""
    bm = BlockManager(num_blocks=num_blocks, block_size=4)
    sched = Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    seqs: dict[str, Sequence] = {}
    log: list[SchedulerOutput] = []
    step = 0
    while step in prompts or sched.has_unfinished() or step <= max(prompts):
        if step in prompts:
            rid = f"r{step}"
            seqs[rid] = Sequence(rid, prompts[step], SamplingParams(), arrival_index=step)
            sched.add(seqs[rid])
        out = sched.schedule()
        assert out.num_batched_tokens <= budget
        log.append(out)
        apply(out, sched, max_tokens)
        bm.check_integrity()
        step += 1
        assert step < 500
    assert bm.num_free_blocks == num_blocks
    return {rid: s.output_token_ids for rid, s in seqs.items()}, log


PROMPTS = {0: list(range(1, 12)), 1: [5, 6, 7], 3: list(range(20, 37)), 4: [9]}


def test_joins_and_chunked_prefill() -> None:
    outs, log = run(PROMPTS, num_blocks=64, budget=8)
    first = log[0].scheduled
    assert [(s.seq.request_id, s.num_new_tokens) for s in first] == [("r0", 8)]
    second = log[1].scheduled
    assert [(s.seq.request_id, s.num_new_tokens) for s in second] == [("r0", 3), ("r1", 3)]
    third = log[2].scheduled  # both decode now
    assert [(s.seq.request_id, s.num_new_tokens) for s in third] == [("r0", 1), ("r1", 1)]
    fourth = log[3].scheduled  # decodes first, then the new prompt's first chunk
    assert [(s.seq.request_id, s.num_new_tokens) for s in fourth] == [
        ("r0", 1),
        ("r1", 1),
        ("r3", 6),
    ]
    assert all(len(v) == 6 for v in outs.values())


def test_preemption_gives_the_same_tokens() -> None:
    reference, _ = run(PROMPTS, num_blocks=64, budget=64)
    outs, log = run(PROMPTS, num_blocks=7, budget=8)
    assert sum(len(o.preempted) for o in log) > 0
    assert outs == reference


def test_max_num_seqs_caps_the_batch() -> None:
    prompts = {0: [1, 2], 1: [3, 4], 2: [5]}
    _, log = run(prompts, num_blocks=64, budget=64, max_num_seqs=1)
    assert all(len(o.scheduled) <= 1 for o in log)
