"""Keeper, CancelCheck and requested_outputs (backends/serving/pb_lifetimes.py): exact release
points against a fake clock and a fake is_cancelled, plus a randomized check against a naive
model of "released once an exchange that started after the hold has returned, or too old"."""

from __future__ import annotations

import gc
import random
import weakref

import pytest

from backends.serving.pb_lifetimes import CancelCheck, Keeper, requested_outputs


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Obj:
    """A weak-referenceable stand-in for a pb_utils object."""


def alive(refs: list[weakref.ref[Obj]]) -> list[bool]:
    gc.collect()
    return [r() is not None for r in refs]


def test_held_until_an_exchange_started_after_the_hold_returns() -> None:
    keeper = Keeper(max_age_s=5.0, clock=Clock())
    objs = [Obj(), Obj()]
    refs = [weakref.ref(o) for o in objs]
    keeper.hold(objs[0])

    def exchange_during_which_b_is_held() -> bool:
        keeper.hold(objs[1])  # a hold while the exchange runs: this exchange proves nothing for it
        return False

    assert keeper.exchange(exchange_during_which_b_is_held) is False
    objs.clear()
    assert alive(refs) == [False, True]
    assert len(keeper) == 1
    assert keeper.exchange(lambda: True) is True
    assert alive(refs) == [False, False]
    assert len(keeper) == 0


def test_an_exchange_that_raises_proves_nothing() -> None:
    keeper = Keeper(clock=Clock())
    keeper.hold(Obj())

    def broken() -> bool:
        raise RuntimeError("stub gone")

    with pytest.raises(RuntimeError, match="^stub gone$"):
        keeper.exchange(broken)
    assert len(keeper) == 1


def test_without_exchanges_objects_go_once_max_age_old() -> None:
    clock = Clock()
    keeper = Keeper(max_age_s=5.0, clock=clock)
    keeper.hold(Obj(), Obj())
    clock.now += 4.0
    keeper.hold(Obj())
    clock.now += 0.999
    keeper.hold()  # any hold or exchange releases what is due
    assert len(keeper) == 3
    clock.now += 0.001
    keeper.hold()
    assert len(keeper) == 1
    clock.now += 4.0
    keeper.hold()
    assert len(keeper) == 0


def test_close_drops_everything_and_bad_age_is_refused() -> None:
    keeper = Keeper(clock=Clock())
    obj = Obj()
    ref = weakref.ref(obj)
    keeper.hold(obj)
    del obj
    keeper.close()
    assert alive([ref]) == [False] and len(keeper) == 0
    with pytest.raises(ValueError, match="^max_age_s must be > 0, got 0$"):
        Keeper(max_age_s=0)


@pytest.mark.parametrize("seed", range(20))
def test_keeper_matches_a_naive_model(seed: int) -> None:
    """Random holds (also during exchanges), exchanges and clock steps; after every operation the
    kept objects are exactly those the naive model keeps."""
    rng = random.Random(seed)
    clock = Clock()
    keeper = Keeper(max_age_s=2.0, clock=clock)
    model: list[tuple[int, float, int]] = []  # (exchanges started at hold, time, id)
    started = proven = 0
    next_id = 0

    def model_release() -> None:
        model[:] = [m for m in model if m[0] >= proven and clock.now - m[1] < 2.0]

    def model_hold(n: int) -> None:
        nonlocal next_id
        for _ in range(n):
            model.append((started, clock.now, next_id))
            next_id += 1
        model_release()

    for _ in range(300):
        op = rng.random()
        if op < 0.4:
            n = rng.randint(0, 3)
            model_hold(n)
            keeper.hold(*(Obj() for _ in range(n)))
        elif op < 0.8:
            started += 1
            number = started
            holds_inside = rng.randint(0, 2)

            def call(k: int = holds_inside) -> bool:
                model_hold(k)
                keeper.hold(*(Obj() for _ in range(k)))
                return False

            keeper.exchange(call)
            proven = max(proven, number)
            model_release()
        else:
            clock.now += rng.choice([0.1, 0.5, 1.0, 2.5])
        assert len(keeper) == len(model)


class Probe:
    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.answers.pop(0)


def test_cancel_check_asks_at_most_once_per_interval_and_remembers_true() -> None:
    clock = Clock()
    keeper = Keeper(clock=clock)
    probe = Probe([False, False, True])
    check = CancelCheck(probe, keeper, interval_s=0.5, clock=clock)
    assert [check(), check()] == [False, False] and probe.calls == 0  # younger than the interval
    clock.now += 0.5
    assert check() is False and probe.calls == 1
    clock.now += 0.49
    assert check() is False and probe.calls == 1
    clock.now += 0.01
    assert check() is False and probe.calls == 2
    clock.now += 0.5
    assert check() is True and probe.calls == 3
    clock.now += 10.0
    assert check() is True and probe.calls == 3 and check.num_probes == 3


def test_cancel_check_is_the_keepers_exchange() -> None:
    clock = Clock()
    keeper = Keeper(clock=clock)
    check = CancelCheck(lambda: False, keeper, interval_s=0.5, clock=clock)
    keeper.hold(Obj())
    clock.now += 0.5
    assert check() is False
    assert len(keeper) == 0
    with pytest.raises(ValueError, match="^interval_s must be > 0, got -1$"):
        CancelCheck(lambda: False, keeper, interval_s=-1)


def test_requested_outputs_keeps_only_what_the_client_asked_for() -> None:
    tensors = {"text_output": 1, "finish_reason": 2, "num_output_tokens": 3}
    assert requested_outputs(tensors, ("num_output_tokens", "text_output", "other")) == {
        "text_output": 1, "num_output_tokens": 3}
    assert requested_outputs(tensors, []) == {}
