"""The Supervisor's policy: load, prefix hits, local prefill, and role switches (pure, exact)."""

from __future__ import annotations

import pytest

from backends.serving.supervisor import (
    ClusterSnapshot,
    Plan,
    Supervisor,
    choose_worker,
    is_local,
    rebalance,
)


def test_choose_worker_prefers_least_loaded_then_listing_order() -> None:
    empty = ClusterSnapshot()
    assert choose_worker(["a", "b", "c"], {"a": 3, "b": 1, "c": 1}, empty, slack=0) == "b"
    assert choose_worker(["a", "b"], {}, empty) == "a"
    assert choose_worker(["a", "b"], {"a": 1}, ClusterSnapshot(queue_len={"b": 2}), slack=0) == "a"


def test_choose_worker_prefers_prefix_hits_within_slack() -> None:
    hits = ClusterSnapshot(num_prompt_blocks=4, matched_blocks={"b": 3, "c": 4})
    assert choose_worker(["a", "b", "c"], {"a": 0, "b": 2, "c": 3}, hits, slack=2) == "b"  # c is 3 over
    assert choose_worker(["a", "b", "c"], {"a": 0, "b": 2, "c": 3}, hits, slack=3) == "c"
    same = ClusterSnapshot(matched_blocks={"a": 2, "b": 2})
    assert choose_worker(["a", "b"], {"a": 1, "b": 0}, same) == "b"  # equal hits: lighter wins
    with pytest.raises(ValueError, match="^candidates: no worker to choose from$"):
        choose_worker([], {}, same)


def test_local_when_disaggregation_off_no_prefill_or_fully_cached() -> None:
    assert is_local(False, True, "d", ClusterSnapshot())
    assert is_local(True, False, "d", ClusterSnapshot())
    assert is_local(True, True, "d", ClusterSnapshot(num_prompt_blocks=3, matched_blocks={"d": 3}))
    assert not is_local(True, True, "d", ClusterSnapshot(num_prompt_blocks=3, matched_blocks={"d": 2, "p": 3}))
    assert not is_local(True, True, "d", ClusterSnapshot(num_prompt_blocks=0))


def test_rebalance_moves_the_idlest_worker_to_the_overloaded_side() -> None:
    load = {"p": 20, "d1": 1, "d2": 0}
    assert rebalance(["p"], ["d1", "d2"], load) == ("d2", "prefill")
    assert rebalance(["p1", "p2"], ["d"], {"p1": 0, "p2": 1, "d": 9}) == ("p1", "decode")
    assert rebalance(["p"], ["d"], {"p": 50, "d": 0}) is None  # each side keeps one worker
    assert rebalance(["p"], ["d1", "d2"], {"p": 7, "d1": 0}) is None  # under min_pending
    assert rebalance(["p"], ["d1", "d2"], {"p": 8, "d1": 2, "d2": 2}) is None  # within ratio


def test_supervisor_plans_counts_and_relabels() -> None:
    sup = Supervisor(["p"], ["d1", "d2"], disaggregation=True)
    assert sup.plan(10) == Plan("p", "d1")
    assert sup.plan(10) == Plan("p", "d2")
    assert sup.plan(10, ClusterSnapshot(num_prompt_blocks=1, matched_blocks={"d1": 1})) == Plan(None, "d1")
    assert sup.load() == {"p": 2, "d1": 2, "d2": 1}
    sup.done(Plan("p", "d1"))
    assert sup.load() == {"p": 1, "d1": 1, "d2": 1}
    sup.relabel("d2", "prefill")
    assert sup.roles() == {"p": "prefill", "d2": "prefill", "d1": "decode"}
    with pytest.raises(ValueError, match="^model: 'd1' is the last decode worker$"):
        sup.relabel("d1", "prefill")
    with pytest.raises(ValueError, match="^model: unknown worker 'x'$"):
        sup.relabel("x", "decode")


def test_supervisor_switches_a_role_when_prefill_is_swamped() -> None:
    sup = Supervisor(["p"], ["d1", "d2"], disaggregation=True)
    for _ in range(8):
        sup.plan(100, ClusterSnapshot(num_prompt_blocks=6, matched_blocks={"p": 6}))
    assert sup.load() == {"p": 8, "d1": 4, "d2": 4}
    assert sup.roles() == {"p": "prefill", "d1": "decode", "d2": "decode"}  # 8 < 4 * 4: balanced enough
    sup2 = Supervisor(["p"], ["d1", "d2"], disaggregation=True)
    for _ in range(9):
        plan = sup2.plan(100)
        sup2.done(Plan(None, plan.decode))  # decode finished, prefill still queued
    sup2.plan(100)
    assert sup2.roles() == {"p": "prefill", "d1": "prefill", "d2": "decode"}


def test_colocated_supervisor_never_plans_a_prefill() -> None:
    sup = Supervisor([], ["w"], disaggregation=False)
    assert sup.plan(50) == Plan(None, "w")
    with pytest.raises(ValueError, match="^prefill_models: disaggregation is on but no prefill worker is listed$"):
        Supervisor([], ["w"], disaggregation=True)


def test_a_later_turn_prefills_locally_on_the_node_with_the_longest_match() -> None:
    # Turn 2 = turn-1 prompt (3 blocks) + reply (2 blocks) + new text: 7 blocks.
    assert is_local(True, True, "d2", ClusterSnapshot(7, matched_blocks={"p1": 3, "d1": 3, "d2": 5}))
    # A tie stays on the decode node when it holds at least half the prompt (no transfer, the
    # smaller half computed there); a short shared prefix (a system prompt) stays disaggregated.
    assert is_local(True, True, "d2", ClusterSnapshot(7, matched_blocks={"p1": 5, "d2": 5}), 120)
    assert is_local(True, True, "d2", ClusterSnapshot(7, matched_blocks={"p1": 4, "d2": 4}), 128)
    assert not is_local(True, True, "d2", ClusterSnapshot(7, matched_blocks={"p1": 4, "d2": 4}), 129)
    assert not is_local(True, True, "d2", ClusterSnapshot(7, matched_blocks={"p1": 1, "d2": 1}), 112)
    assert not is_local(True, True, "d2", ClusterSnapshot(7, matched_blocks={"p1": 0, "d2": 0}), 112)
    assert not is_local(True, True, "d2", ClusterSnapshot(7, matched_blocks={"d1": 6, "d2": 5}))
    sup = Supervisor(["p1", "p2"], ["d1", "d2"], disaggregation=True)
    turn2 = ClusterSnapshot(7, matched_blocks={"p1": 3, "d2": 5})
    assert sup.plan(112, turn2) == Plan(None, "d2")  # prefill on the decode node: reply reused
    assert sup.plan(112, ClusterSnapshot(7, matched_blocks={"p2": 5, "d1": 3})) == Plan("p2", "d1")
    assert sup.plan(112, ClusterSnapshot(7, matched_blocks={"p1": 3, "d1": 3})) == Plan("p1", "d1")  # tie, 48 of 112
    local = sup.plan(90, ClusterSnapshot(5, matched_blocks={"p1": 3, "d1": 3}))
    assert local == Plan(None, "d1")  # a tie holding 48 of 90 tokens
    sup.done(local)
    assert sup.load() == {"p1": 1, "p2": 1, "d1": 2, "d2": 1}
    busy = ClusterSnapshot(7, queue_len={"d2": 4}, matched_blocks={"p1": 3, "d2": 5})
    assert sup.plan(112, busy) == Plan("p1", "d1")  # d2 (1 + 4 queued) is past d1 (2) + slack 2: p1 has 3 blocks
