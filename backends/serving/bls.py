"""Reaching the worker models through BLS, and the public request's channel (inside the Triton stub).

``exec(decoupled=True)`` hands back a response iterator whose ``next`` blocks until the
worker's next response; each stream's request and reads run on one thread of our own pool of
daemon threads (sized here, not asyncio's default executor, which python_backend's
``async_exec`` would use), so the event loop (and every other request) keeps going, and hand
the responses to the loop in batches. Every iterator is read to its final response, then held
by the model's Keeper until python_backend has let go of it (backends/serving/pb_lifetimes.py),
except a stream abandoned because its worker died (worker_health.ABANDON): its final response
never comes, and the thread inside its ``next`` is given up.
A worker error response becomes WorkerError with its code. A public request's channel is used
from the event loop thread only: its responses, its cancellation checks (CancelCheck: over IPC
at most every 0.5 s) and, after its final response, handing the request to the Keeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from backends.serving import specs
from backends.serving.daemon_executor import DaemonExecutor
from backends.serving.errors import (
    INTERNAL,
    WorkerError,
    code_name,
    split_worker_message,
    triton_error,
)
from backends.serving.pb_lifetimes import CancelCheck, Keeper, requested_outputs
from backends.serving.public_io import Chunk, ensemble_tensors, llm_tensors
from backends.serving.requests import GenerateRequest
from backends.serving.triton_io import make_response
from backends.serving.worker_health import ABANDON
from backends.serving.worker_io import (
    WorkerJob,
    WorkerUpdate,
    job_parameters,
    job_tensors,
    merge_updates,
    parse_update,
)

WORKER_OUTPUT_NAMES = [t.name for t in specs.WORKER_OUTPUTS]
_DONE = object()


class BlsWorkers:
    """WorkerClient over pb_utils BLS. ``close()`` stops its threads (daemons: a ``next`` that
    never returns cannot hold up the stub's exit). Finished iterators go to ``keeper``."""

    def __init__(self, pb_utils: Any, keeper: Keeper, max_threads: int = 1024) -> None:
        self._pb = pb_utils
        self._keeper = keeper
        self._pool = DaemonExecutor(max_threads, "pd-bls")

    def _request(self, model: str, job: WorkerJob) -> Any:
        tensors = [self._pb.Tensor(n, v) for n, v in job_tensors(job).items()]
        return self._pb.InferenceRequest(
            model_name=model, inputs=tensors, requested_output_names=WORKER_OUTPUT_NAMES,
            parameters=job_parameters(job))

    async def stream(self, model: str, job: WorkerJob) -> AsyncIterator[WorkerUpdate]:
        """The worker's updates for ``job``, several merged into one (worker_io.merge_updates)
        when they arrived while the event loop was busy, so a loaded orchestrator sends fewer,
        larger responses instead of falling behind. One pool thread per stream runs the BLS
        request and reads its response iterator to the end, however the caller stops (a final
        update, an error, or abandoning the stream: python_backend forgets a BLS iterator
        dropped before its final response and then blocks in the stub's finalize draining it
        forever), then hands the iterator to the Keeper (dropped before the stub erased it from
        its map, it would be destroyed without the GIL: pb_lifetimes.py). Cancelled with
        ABANDON (its worker is dead), the thread inside ``next`` is written off."""
        inbox = _Inbox(asyncio.get_running_loop())
        self._pool.submit(self._read, model, self._request(model, job), inbox)
        try:
            while True:
                updates: list[WorkerUpdate] = []
                for item in await inbox.get():
                    if isinstance(item, WorkerUpdate):
                        updates.append(item)
                        continue
                    if updates:
                        yield merge_updates(updates)
                    if item is _DONE:
                        return
                    raise item
                if updates:
                    update = merge_updates(updates)
                    yield update
                    if update.final:
                        return
        except asyncio.CancelledError as exc:
            if ABANDON in exc.args:
                if inbox.iterator is not None:
                    self._keeper.hold(inbox.iterator)
                self._pool.write_off()
            raise

    def _read(self, model: str, request: Any, inbox: _Inbox) -> None:
        """A pool thread: runs ``request`` and puts each response (a WorkerUpdate or a
        WorkerError), then _DONE, into ``inbox``; the iterator then goes to the Keeper."""
        try:
            iterator = inbox.iterator = iter(request.exec(decoupled=True))
        except BaseException as exc:  # the request never reached the worker
            inbox.put(exc)
            return
        try:
            response: Any
            while (response := next(iterator, _DONE)) is not _DONE:
                if response.has_error():
                    err = response.error()
                    message, code = split_worker_message(err.message(), code_name(self._pb, err))
                    inbox.put(WorkerError(f"{model}: {message}", code))
                    continue
                outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
                if outputs:  # not the empty flag-only final response
                    update = parse_update(outputs)
                    if update.error:  # a failure after data (worker_io.failure_update)
                        message, code = split_worker_message(update.error, INTERNAL)
                        inbox.put(WorkerError(f"{model}: {message}", code))
                    else:
                        inbox.put(update)
            inbox.put(_DONE)
        except BaseException as exc:  # a broken response: the stream ends with it
            inbox.put(exc)
            while next(iterator, _DONE) is not _DONE:
                pass
        finally:
            self._keeper.hold(iterator)

    async def cancel(self, model: str, request_id: str) -> None:
        job = WorkerJob(request_id, "cancel")
        async for _ in self.stream(model, job):
            pass

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Inbox:
    """What a reader thread hands to the event loop: ``put`` from the thread, ``get`` (every
    item queued so far, waiting for one when there is none) on the loop. The loop is woken
    once per batch, not once per item."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None
        self._lock = threading.Lock()
        self.iterator: Any = None  # the BLS response iterator, once the request is sent

    def put(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                self._loop.call_soon_threadsafe(_wake, waiter)

    async def get(self) -> list[Any]:
        with self._lock:
            if not self._items:
                self._waiter = waiter = self._loop.create_future()
            else:
                waiter = None
        if waiter is not None:
            await waiter
        with self._lock:
            items, self._items = self._items, []
        return items


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def public_tensors(req: GenerateRequest, chunk: Chunk, block_size: int) -> dict[str, np.ndarray]:
    """The public model's output tensors for ``chunk`` (``llm`` 1-D, ``ensemble`` batched)."""
    return llm_tensors(req, chunk) if req.api == "llm" else ensemble_tensors(req, chunk, block_size)


class TritonChannel:
    """ClientChannel over a public request's response sender (a decoupled public model).

    Event loop thread only. ``send(final=True)`` and ``fail`` end it: the request goes to the
    Keeper (its last is_cancelled message may still be in the parent's hands)."""

    def __init__(self, pb_utils: Any, request: Any, req: GenerateRequest | None, block_size: int,
                 keeper: Keeper) -> None:
        self._pb = pb_utils
        self._request = request
        self._sender = request.get_response_sender()
        self._outputs = tuple(request.requested_output_names())
        self._keeper = keeper
        self.is_cancelled = CancelCheck(request.is_cancelled, keeper)
        self.req = req
        self._block_size = block_size

    def send(self, chunk: Chunk, final: bool) -> None:
        if self.req is None:
            raise RuntimeError("TritonChannel.send before the request was parsed")
        tensors = requested_outputs(public_tensors(self.req, chunk, self._block_size), self._outputs)
        flags = self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            self._sender.send(make_response(self._pb, tensors), flags=flags)
        finally:
            if final:
                self._keeper.hold(self._request, self._sender)

    def fail(self, exc: BaseException) -> None:
        response = self._pb.InferenceResponse(output_tensors=[], error=triton_error(self._pb, exc))
        try:
            self._sender.send(response, flags=self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self._keeper.hold(self._request, self._sender)


class TritonReply:
    """ClientChannel of a non-decoupled public model: keeps the request's one response.

    ``execute`` returns ``response`` (set by the final ``send`` or by ``fail``); a non-final
    chunk is a broken invariant (the request must have been refused with stream=true). The stub
    owns the request until it has sent the response; the request then goes to the Keeper.
    """

    def __init__(self, pb_utils: Any, request: Any, req: GenerateRequest | None, block_size: int,
                 keeper: Keeper) -> None:
        self._pb = pb_utils
        self._request = request
        self._outputs = tuple(request.requested_output_names())
        self.is_cancelled = CancelCheck(request.is_cancelled, keeper)
        self.req = req
        self._block_size = block_size
        self.response: Any = None

    def send(self, chunk: Chunk, final: bool) -> None:
        if self.req is None or not final:
            raise RuntimeError(f"TritonReply.send: a non-decoupled model sends one final response "
                               f"(parsed={self.req is not None}, final={final})")
        tensors = requested_outputs(public_tensors(self.req, chunk, self._block_size), self._outputs)
        self.response = make_response(self._pb, tensors)

    def fail(self, exc: BaseException) -> None:
        self.response = self._pb.InferenceResponse(output_tensors=[], error=triton_error(self._pb, exc))
