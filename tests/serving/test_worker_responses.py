"""Responder (backends/serving/worker_responses.py): the worker's response thread delivers in
order, checks only unfinished requests for a cancel, reports each cancel once, and never calls
a sink from a second thread."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from backends.serving.worker_io import WorkerUpdate
from backends.serving.worker_responses import POLL_S, Responder


class Sink:
    """Records every call and the thread that made it; cancelled from ``cancel_at`` on."""

    def __init__(self, cancel_at: float = float("inf")) -> None:
        self.calls: list[str] = []
        self.threads: set[str] = set()
        self.cancel_at = cancel_at

    def _record(self, call: str) -> None:
        self.calls.append(call)
        self.threads.add(threading.current_thread().name)

    def send(self, update: WorkerUpdate) -> None:
        self._record(f"send {update.new_token_ids} final={update.final}")

    def fail(self, exc: BaseException) -> None:
        self._record(f"fail {exc}")

    def is_cancelled(self) -> bool:
        self._record("is_cancelled")
        return time.monotonic() >= self.cancel_at


def update(token: int, final: bool = False) -> WorkerUpdate:
    return WorkerUpdate((token,), (), final, "length" if final else "", 3, 1, 0)


def without_checks(calls: list[str]) -> list[str]:
    return [c for c in calls if c != "is_cancelled"]


def test_updates_go_out_in_order_and_no_check_follows_the_final() -> None:
    cancels: queue.Queue[str] = queue.Queue()
    responder = Responder(cancels.put)
    sink = Sink()
    try:
        responder.watch("r1", sink)
        responder.send("r1", sink, update(1))
        time.sleep(3 * POLL_S)  # watched: checked while unfinished
        responder.send("r1", sink, update(2, final=True))
        responder.send("r1", sink, update(3))  # a stray update after the final still goes out
        time.sleep(3 * POLL_S)
    finally:
        responder.close()
    assert without_checks(sink.calls) == ["send (1,) final=False", "send (2,) final=True", "send (3,) final=False"]
    final_at = sink.calls.index("send (2,) final=True")
    assert "is_cancelled" in sink.calls[:final_at]
    assert "is_cancelled" not in sink.calls[final_at:]
    assert sink.threads == {"pd-respond"}
    assert cancels.empty()


def test_a_cancel_is_reported_once_and_the_final_error_still_goes_out() -> None:
    cancels: queue.Queue[str] = queue.Queue()
    responder = Responder(cancels.put)
    sink, other = Sink(cancel_at=time.monotonic()), Sink()
    try:
        responder.watch("gone", sink)
        responder.watch("stays", other)
        assert cancels.get(timeout=5) == "gone"
        time.sleep(3 * POLL_S)
        responder.fail("gone", sink, RuntimeError("request gone cancelled"))
        responder.send("stays", other, update(9, final=True))
    finally:
        responder.close()
    assert cancels.empty()
    assert sink.calls.count("is_cancelled") == 1
    assert without_checks(sink.calls) == ["fail request gone cancelled"]
    assert without_checks(other.calls) == ["send (9,) final=True"]


def test_a_failing_sink_does_not_stop_the_others() -> None:
    class Broken(Sink):
        def send(self, update: WorkerUpdate) -> None:
            raise ConnectionError("client gone")

        def is_cancelled(self) -> bool:
            raise ConnectionError("client gone")

    cancels: queue.Queue[str] = queue.Queue()
    responder = Responder(cancels.put)
    broken, fine = Broken(), Sink()
    try:
        responder.watch("b", broken)
        assert cancels.get(timeout=5) == "b"  # a check that fails counts as a cancel
        responder.send("b", broken, update(1, final=True))
        responder.send("f", fine, update(2, final=True))
    finally:
        responder.close()
    assert fine.calls == ["send (2,) final=True"]


def test_updates_queued_together_go_out_as_one_response_per_request() -> None:
    """When the engine outruns the response thread, each request's queued updates merge into
    one response (tokens in order, the last one's end); other requests, watches and errors keep
    their place."""
    from backends.serving.worker_responses import _coalesced, _Item

    a, b, c = Sink(), Sink(), Sink()
    items = [_Item("a", a, update(1)), _Item("b", b, update(7)), _Item("a", a, update(2)),
             _Item("c", c), _Item("a", a, update(3, final=True)), _Item("b", b, error=ValueError("x")),
             _Item("b", b, update(8))]
    out = _coalesced(items)
    assert [(i.request_id, i.update.new_token_ids if i.update else None, i.update.final if i.update else None,
             repr(i.error) if i.error else None) for i in out] == [
        ("a", (1, 2, 3), True, None), ("b", (7,), False, None), ("c", None, None, None),
        ("b", None, None, "ValueError('x')"), ("b", (8,), False, None)]
    assert out[0].update is not None and out[0].update.finish_reason == "length"


def _sent_tokens(calls: list[str]) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in c.split("(")[1].split(")")[0].split(",") if t.strip())
            for c in without_checks(calls) if c.startswith("send")]


def test_a_stream_interval_sends_the_first_token_at_once_then_groups_of_n() -> None:
    responder = Responder(lambda rid: None, stream_interval=3)
    sink = Sink()
    try:
        responder.watch("r", sink)
        for token in range(1, 9):
            responder.send("r", sink, update(token))
            time.sleep(0.02)  # one at a time: the interval groups them, not the queue
        responder.send("r", sink, update(9, final=True))
    finally:
        responder.close()
    groups = _sent_tokens(sink.calls)
    assert [t for g in groups for t in g] == list(range(1, 10))  # nothing dropped or reordered
    assert groups[0] == (1,)
    assert all(len(g) >= 3 for g in groups[1:-1])
    assert without_checks(sink.calls)[-1].endswith("final=True")
    assert sum(c.endswith("final=True") for c in sink.calls) == 1


def test_a_stream_interval_releases_held_tokens_before_an_error() -> None:
    responder = Responder(lambda rid: None, stream_interval=8)
    sink = Sink()
    try:
        responder.watch("r", sink)
        for token in (1, 2, 3):
            responder.send("r", sink, update(token))
            time.sleep(0.02)
        responder.fail("r", sink, RuntimeError("engine gone"))
    finally:
        responder.close()
    calls = without_checks(sink.calls)
    assert _sent_tokens(calls) == [(1,), (2, 3)]
    assert calls[-1] == "fail engine gone"


def test_a_stream_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stream_interval must be >= 1, got 0"):
        Responder(lambda rid: None, stream_interval=0)


def test_a_stream_interval_keeps_held_tokens_for_their_own_sink() -> None:
    """A cancel job answers on its own sink under its target's request id: the target's held
    tokens stay with the target."""
    responder = Responder(lambda rid: None, stream_interval=8)
    target, cancel = Sink(), Sink()
    try:
        responder.watch("r", target)
        for token in (1, 2, 3):
            responder.send("r", target, update(token))
            time.sleep(0.02)
        responder.send("r", cancel, WorkerUpdate((), (), True, "", 0, 0, 0))
        time.sleep(0.05)
        responder.send("r", target, update(4, final=True))
    finally:
        responder.close()
    assert _sent_tokens(cancel.calls) == [()]
    assert [t for g in _sent_tokens(target.calls) for t in g] == [1, 2, 3, 4]
