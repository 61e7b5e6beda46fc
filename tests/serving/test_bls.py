"""BlsWorkers.stream reads every BLS response iterator to its end, however its caller stops,
and then hands it to the Keeper.

python_backend (2.51) forgets a decoupled BLS response iterator dropped before its final
response, then blocks forever draining it when the stub finalizes (the model never unloads);
one dropped before the stub erased it from its map is destroyed without the GIL
(backends/serving/pb_lifetimes.py). The pb_utils stand-in below is the BLS transport only;
the code under test is BlsWorkers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from backends.serving.bls import BlsWorkers
from backends.serving.pb_lifetimes import Keeper
from backends.serving.worker_health import ABANDON
from backends.serving.worker_io import WorkerJob, WorkerUpdate, update_tensors


class _Tensor:
    def __init__(self, name: str, value: np.ndarray) -> None:
        self._name, self._value = name, value

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._value


class _Response:
    def __init__(self, update: WorkerUpdate) -> None:
        self._tensors = [_Tensor(n, v) for n, v in update_tensors(update).items()]

    def has_error(self) -> bool:
        return False

    def output_tensors(self) -> list[_Tensor]:
        return self._tensors


class _Transport:
    """Serves one decoupled BLS stream of ``tokens`` (the last one final); records what was read."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.read: list[int] = []
        self.ended = threading.Event()
        self.iterators: list[Iterator[_Response]] = []

    def open(self) -> Iterator[_Response]:
        self.iterators.append(self.responses())
        return self.iterators[-1]

    def responses(self) -> Iterator[_Response]:
        for i, token in enumerate(self.tokens):
            self.read.append(token)
            final = i == len(self.tokens) - 1
            yield _Response(WorkerUpdate((token,), (), final, "length" if final else "", 3, i + 1, 0))
        self.ended.set()


class _PbUtils:
    def __init__(self, transport: _Transport) -> None:
        self._transport = transport
        self.Tensor = _Tensor

    def InferenceRequest(self, **kwargs: Any) -> Any:  # noqa: N802 - pb_utils' name
        transport = self._transport

        class _Request:
            def exec(self, decoupled: bool) -> Iterator[_Response]:  # noqa: A003 - pb_utils' name
                assert decoupled
                return transport.open()

        return _Request()


def _first_update(workers: BlsWorkers) -> WorkerUpdate:
    async def run() -> WorkerUpdate:
        stream: Any = workers.stream("worker", WorkerJob("r1", "context_and_generation", (1, 2, 3)))
        first = await stream.__anext__()
        await stream.aclose()  # the caller abandons the stream (a client cancel, a stop string)
        return first

    return asyncio.run(run())


def _wait_held(keeper: Keeper, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(keeper) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_abandoned_stream_is_read_to_its_final_response_then_kept() -> None:
    transport = _Transport([7, 8, 9, 10])
    keeper = Keeper()
    workers = BlsWorkers(_PbUtils(transport), keeper)
    try:
        first = _first_update(workers)
        assert transport.ended.wait(5)
        _wait_held(keeper, 1)
    finally:
        workers.close()
    # The first update holds 7 and whatever else had arrived (merged); the rest was read anyway.
    assert first.new_token_ids == (7, 8, 9, 10)[:len(first.new_token_ids)] and first.new_token_ids
    assert transport.read == [7, 8, 9, 10]
    # Held until an is_cancelled exchange started after it returns.
    assert len(keeper) == 1
    keeper.exchange(lambda: False)
    assert len(keeper) == 0


def test_stream_read_to_the_end_yields_every_update() -> None:
    transport = _Transport([4, 5])

    async def run(workers: BlsWorkers) -> list[tuple[tuple[int, ...], bool, str]]:
        job = WorkerJob("r2", "context_and_generation", (1,))
        return [(u.new_token_ids, u.final, u.finish_reason) async for u in workers.stream("worker", job)]

    keeper = Keeper()
    workers = BlsWorkers(_PbUtils(transport), keeper)
    try:
        updates = asyncio.run(run(workers))
        assert transport.ended.wait(5)
        _wait_held(keeper, 1)
    finally:
        workers.close()
    # One update per response, or both merged when they arrived together; the end is the last's.
    assert tuple(t for u in updates for t in u[0]) == (4, 5)
    assert updates[-1][1:] == (True, "length") and all(u[1:] == (False, "") for u in updates[:-1])
    assert transport.read == [4, 5]
    assert len(keeper) == 1


def test_a_stream_abandoned_for_a_dead_worker_is_kept_without_draining() -> None:
    """Cancelled with ABANDON while its ``next`` blocks (the worker died): no drain is started
    (it would block a second thread for good); the iterator is kept and the blocked thread is
    written off, so the next call gets a thread of its own."""
    dead = threading.Event()
    blocked = threading.Event()
    transport = _Transport([7, 8])

    def responses() -> Iterator[_Response]:
        yield _Response(WorkerUpdate((7,), (), False, "", 3, 1, 0))
        blocked.set()
        dead.wait(10)  # the worker died: its next response never comes
        yield _Response(WorkerUpdate((8,), (), True, "length", 3, 2, 0))

    transport.responses = responses  # type: ignore[method-assign]

    async def run(workers: BlsWorkers) -> tuple[tuple[int, ...], str]:
        stream: Any = workers.stream("worker", WorkerJob("r3", "context_and_generation", (1,)))
        first = await stream.__anext__()
        pending = asyncio.ensure_future(stream.__anext__())
        while not blocked.is_set():  # its next() is inside the worker's silence
            await asyncio.sleep(0.01)
        pending.cancel(ABANDON)
        await asyncio.gather(pending, return_exceptions=True)
        name = await asyncio.get_running_loop().run_in_executor(
            workers._pool, lambda: threading.current_thread().name)
        return first.new_token_ids, name

    keeper = Keeper()
    workers = BlsWorkers(_PbUtils(transport), keeper, max_threads=1)
    try:
        first, name = asyncio.run(run(workers))
        assert len(keeper) == 1
    finally:
        dead.set()
        workers.close()
    assert (first, name) == ((7,), "pd-bls_1")


def test_responses_that_arrive_while_the_loop_is_busy_come_as_one_update() -> None:
    """The reader thread queues responses; the event loop takes all that arrived since it last
    looked as one merged update (fewer, larger client responses under load), in order, with the
    final one's end."""
    transport = _Transport([1, 2, 3, 4])
    release = threading.Event()
    respond = transport.responses

    def gated() -> Iterator[_Response]:
        release.wait(5)
        yield from respond()

    transport.responses = gated  # type: ignore[method-assign]

    async def run(workers: BlsWorkers) -> list[tuple[tuple[int, ...], bool, str]]:
        stream: Any = workers.stream("worker", WorkerJob("r9", "context_and_generation", (1,)))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)  # the stream has sent its request and waits for a response
        release.set()
        assert transport.ended.wait(5)  # the loop is busy (blocked here) while all four arrive
        update = await first
        return [(update.new_token_ids, update.final, update.finish_reason)] + [
            (u.new_token_ids, u.final, u.finish_reason) async for u in stream]

    keeper = Keeper()
    workers = BlsWorkers(_PbUtils(transport), keeper)
    try:
        assert asyncio.run(run(workers)) == [((1, 2, 3, 4), True, "length")]
        _wait_held(keeper, 1)
    finally:
        workers.close()


@pytest.mark.parametrize(("tagged", "code", "message"), [
    ("[CANCELLED] request cancelled", "CANCELLED", "worker: request cancelled"),
    ("[INTERNAL] engine step failed: boom", "INTERNAL", "worker: engine step failed: boom"),
    ("no tag", "INTERNAL", "worker: no tag"),
])
def test_a_failure_after_data_becomes_the_worker_error_it_carries(tagged: str, code: str, message: str) -> None:
    """A worker ends a request that fails after streaming data with a final update carrying the
    error (an error response after data responses is lost by python_backend 2.51 on its way
    here: worker_io.failure_update); the caller sees the WorkerError with the code it names."""
    from backends.serving.errors import WorkerError
    from backends.serving.worker_io import failure_update

    transport = _Transport([7])

    def responses() -> Iterator[_Response]:
        yield _Response(WorkerUpdate((7,), (), False, "", 3, 1, 0))
        yield _Response(failure_update(tagged))
        transport.ended.set()

    transport.responses = responses  # type: ignore[method-assign]

    async def run(workers: BlsWorkers) -> tuple[list[tuple[int, ...]], BaseException | None]:
        seen: list[tuple[int, ...]] = []
        try:
            async for update in workers.stream("worker", WorkerJob("r4", "context_and_generation", (1,))):
                seen.append(update.new_token_ids)
        except WorkerError as exc:
            return seen, exc
        return seen, None

    keeper = Keeper()
    workers = BlsWorkers(_PbUtils(transport), keeper)
    try:
        seen, error = asyncio.run(run(workers))
        assert transport.ended.wait(5)
    finally:
        workers.close()
    assert seen == [(7,)]
    assert isinstance(error, WorkerError) and error.code == code
    assert str(error) == message
