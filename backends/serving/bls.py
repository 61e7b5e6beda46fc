"""Reaching the worker models through BLS, and the public request's channel (inside the Triton stub).

``async_exec(decoupled=True)`` hands back a response iterator whose ``next`` blocks until the
worker's next response; each ``next`` runs on a pool of daemon threads so the event loop (and
every other request) keeps going. Every iterator is read to its final response. A worker error response becomes WorkerError with its code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from backends.serving import specs
from backends.serving.daemon_executor import DaemonExecutor
from backends.serving.errors import WorkerError, code_name, triton_error
from backends.serving.public_io import Chunk, ensemble_tensors, llm_tensors
from backends.serving.requests import GenerateRequest
from backends.serving.triton_io import make_response
from backends.serving.worker_io import (
    WorkerJob,
    WorkerUpdate,
    job_parameters,
    job_tensors,
    parse_update,
)

WORKER_OUTPUT_NAMES = [t.name for t in specs.WORKER_OUTPUTS]
_DONE = object()


class BlsWorkers:
    """WorkerClient over pb_utils BLS. ``close()`` stops its threads (daemons: a ``next`` that
    never returns cannot hold up the stub's exit)."""

    def __init__(self, pb_utils: Any, max_threads: int = 256) -> None:
        self._pb = pb_utils
        self._pool = DaemonExecutor(max_threads, "pd-bls")

    def _request(self, model: str, job: WorkerJob) -> Any:
        tensors = [self._pb.Tensor(n, v) for n, v in job_tensors(job).items()]
        return self._pb.InferenceRequest(
            model_name=model, inputs=tensors, requested_output_names=WORKER_OUTPUT_NAMES,
            parameters=job_parameters(job))

    async def stream(self, model: str, job: WorkerJob) -> AsyncIterator[WorkerUpdate]:
        """The worker's updates for ``job``. However the caller stops (a final update, an error,
        or abandoning the stream), the response iterator is read to its end: python_backend
        forgets a BLS iterator dropped before its final response and then blocks in the stub's
        finalize draining it forever (the model never unloads)."""
        responses = await self._request(model, job).async_exec(decoupled=True)
        iterator = iter(responses)
        loop = asyncio.get_running_loop()
        ended = False
        try:
            while True:
                response: Any = await loop.run_in_executor(self._pool, next, iterator, _DONE)
                if response is _DONE:
                    ended = True
                    return
                if response.has_error():
                    err = response.error()
                    raise WorkerError(f"{model}: {err.message()}", code_name(self._pb, err))
                outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
                if not outputs:
                    continue  # the empty flag-only final response
                update = parse_update(outputs)
                yield update
                if update.final:
                    return
        finally:
            if not ended:
                with contextlib.suppress(RuntimeError):  # closed: the stub's finalize drains it
                    self._pool.submit(_drain, iterator)

    async def cancel(self, model: str, request_id: str) -> None:
        job = WorkerJob(request_id, "cancel")
        async for _ in self.stream(model, job):
            pass

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _drain(iterator: Any) -> None:
    """Reads a BLS response iterator to its final response (the worker always sends one)."""
    for _ in iterator:
        pass


def public_tensors(req: GenerateRequest, chunk: Chunk, block_size: int) -> dict[str, np.ndarray]:
    """The public model's output tensors for ``chunk`` (``llm`` 1-D, ``ensemble`` batched)."""
    return llm_tensors(req, chunk) if req.api == "llm" else ensemble_tensors(chunk, block_size)


class TritonChannel:
    """ClientChannel over a public request's response sender (a decoupled public model)."""

    def __init__(self, pb_utils: Any, request: Any, req: GenerateRequest | None, block_size: int) -> None:
        self._pb = pb_utils
        self._request = request
        self._sender = request.get_response_sender()
        self.req = req
        self._block_size = block_size

    def send(self, chunk: Chunk, final: bool) -> None:
        if self.req is None:
            raise RuntimeError("TritonChannel.send before the request was parsed")
        flags = self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self._sender.send(make_response(self._pb, public_tensors(self.req, chunk, self._block_size)), flags=flags)

    def fail(self, exc: BaseException) -> None:
        response = self._pb.InferenceResponse(output_tensors=[], error=triton_error(self._pb, exc))
        self._sender.send(response, flags=self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def is_cancelled(self) -> bool:
        return bool(self._request.is_cancelled())


class TritonReply:
    """ClientChannel of a non-decoupled public model: keeps the request's one response.

    ``execute`` returns ``response`` (set by the final ``send`` or by ``fail``); a non-final
    chunk is a broken invariant (the request must have been refused with stream=true).
    """

    def __init__(self, pb_utils: Any, request: Any, req: GenerateRequest | None, block_size: int) -> None:
        self._pb = pb_utils
        self._request = request
        self.req = req
        self._block_size = block_size
        self.response: Any = None

    def send(self, chunk: Chunk, final: bool) -> None:
        if self.req is None or not final:
            raise RuntimeError(f"TritonReply.send: a non-decoupled model sends one final response "
                               f"(parsed={self.req is not None}, final={final})")
        self.response = make_response(self._pb, public_tensors(self.req, chunk, self._block_size))

    def fail(self, exc: BaseException) -> None:
        self.response = self._pb.InferenceResponse(output_tensors=[], error=triton_error(self._pb, exc))

    def is_cancelled(self) -> bool:
        return bool(self._request.is_cancelled())
