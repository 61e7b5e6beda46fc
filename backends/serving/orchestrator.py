"""The pd_orchestrator service: tokenize, plan, prefill → first token → decode stream.

One coroutine per request (``Orchestrator.handle``); requests never wait on each other. Workers
are reached through a WorkerClient (BLS inside Triton). The first token is sent to the client
as soon as the prefill worker returns it; the decode worker then streams the rest. Text is
produced by a TextStream (UTF-8-safe, stop strings). If the client cancels, a ``cancel`` job
goes to the worker that holds the request (and to the prefill worker whose KV it was to pull,
so the hand-off is dropped) and the client gets CANCELLED; cancellation is polled while waiting.

Faults (DESIGN.md): a failed prefill is retried once, then the request is recomputed on the
decode worker (context_and_generation); a generation_only that fails before its first token
is recomputed there too (with the prefill's first token as prior output). Every request ends
with a final chunk or an error.

Dead workers (worker_health.py): a wait for a worker's next update that lasts ``silence_s``
asks whether the worker is alive; if not, the stream is abandoned (WorkerError UNAVAILABLE
naming the model), the Supervisor stops planning on it, and the request goes on elsewhere: a
dead prefill is not retried (recompute on decode); a dead decode worker's request is recomputed
on another live worker with the tokens streamed so far as prior output (the client's stream
goes on); with no other live worker it ends with that error. Down workers are re-probed as
requests arrive and planned on again once they answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from backends.engine.text_stream import TextStream
from backends.serving.chat import with_chat_prompt
from backends.serving.errors import (
    CANCELLED,
    INVALID_ARG,
    UNAVAILABLE,
    RequestCancelled,
    WorkerError,
    WorkerUnavailable,
)
from backends.serving.public_io import Chunk, Timing
from backends.serving.requests import GenerateRequest, with_bad_words_ids
from backends.serving.supervisor import ClusterSnapshot, Plan, Supervisor
from backends.serving.worker_health import ABANDON, WorkerHealth
from backends.serving.worker_io import WorkerJob, WorkerUpdate

LOG = logging.getLogger(__name__)
CANCEL_POLL_S = 0.1
STALL_S = 60.0  # the longest a request waits for its worker's next update, the worker alive or not
CANCEL_TIMEOUT_S = 10.0
PREFILL_ATTEMPTS = 2


class WorkerClient(Protocol):
    def stream(self, model: str, job: WorkerJob) -> AsyncIterator[WorkerUpdate]: ...
    async def cancel(self, model: str, request_id: str) -> None: ...


class ClientChannel(Protocol):
    """The public request's side: where chunks go, and whether the client gave up."""

    def send(self, chunk: Chunk, final: bool) -> None: ...
    def is_cancelled(self) -> bool: ...


@dataclass(slots=True)
class _Watch:
    """What the watchdog of one worker stream knows: the last update's time (``since``: reset
    by a probe the worker answered; ``updated``: not), why it stopped the read ("cancelled":
    the client; "silent": the worker died; "stalled": alive, but this stream made no progress
    for ``stall_s``), and the silence it saw."""

    since: float
    updated: float
    reason: str = ""
    silent_s: float = 0.0


@dataclass(slots=True)
class _Run:
    req: GenerateRequest
    prompt_ids: list[int]
    text: TextStream
    arrival_ns: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    first_token_ns: int = 0
    last_token_ns: int = 0
    num_cached_tokens: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_ns: int = 0
    finish_reason: str = ""
    sent_tokens: int = 0
    sent_logprobs: int = 0
    handle: bytes = b""
    carried: str = ""

    def timing(self) -> Timing:
        return Timing(self.arrival_ns, self.first_token_ns, self.last_token_ns or time.time_ns(),
                      len(self.prompt_ids), len(self.output_ids), self.num_cached_tokens,
                      self.kv_transfer_bytes, self.kv_transfer_ns)


class Orchestrator:
    def __init__(self, tokenizer: Any, supervisor: Supervisor, workers: WorkerClient,
                 max_model_len: int,
                 cluster: Callable[[Sequence[int]], Awaitable[ClusterSnapshot | None]] | None = None,
                 health: WorkerHealth | None = None, stall_s: float = STALL_S) -> None:
        if stall_s <= 0:
            raise ValueError(f"worker_stall_s: expected > 0, got {stall_s}")
        self._stall_s = stall_s
        self._health = health
        self._cluster = cluster  # the master's view for planning (kv_cluster.ClusterView.within)
        self._tokenizer = tokenizer
        self._supervisor = supervisor
        self._workers = workers
        self._max_model_len = max_model_len

    def tokenize(self, req: GenerateRequest) -> list[int]:
        """The prompt's token ids. A max_tokens beyond the room left (max_model_len - prompt) is
        not refused: as in vLLM, the engine ends the request with "length" when the sequence
        reaches max_model_len. Only a prompt longer than max_model_len is (ValueError)."""
        ids = list(self._tokenizer.encode(req.prompt))
        if len(ids) > self._max_model_len:
            raise ValueError(f"text_input: the prompt (length {len(ids)}) is longer than the maximum "
                             f"model length of {self._max_model_len}")
        return ids

    async def handle(self, req: GenerateRequest, client: ClientChannel) -> Timing:
        """Runs one request to its final chunk; raises (ValueError, RequestCancelled, ...) otherwise."""
        arrival_ns = time.time_ns()
        req = with_chat_prompt(req, self._tokenizer)
        prompt_ids = self.tokenize(req)
        req = with_bad_words_ids(req, self._tokenizer)
        run = _Run(req, prompt_ids, TextStream(self._tokenizer, req.params.stop, prompt_ids), arrival_ns)
        plan = await self._plan(prompt_ids)
        try:
            await self._execute(run, plan, client)
        finally:
            self._supervisor.done(plan)
        timing = run.timing()
        client.send(self._final_chunk(run, timing), final=True)
        return timing

    async def _plan(self, prompt_ids: list[int]) -> Plan:
        snapshot = await self._snapshot(prompt_ids)
        if self._health is None:
            return self._supervisor.plan(len(prompt_ids), snapshot)
        self._health.revive()
        try:
            return self._supervisor.plan(len(prompt_ids), snapshot)
        except WorkerUnavailable:  # every worker down: ask them now rather than fail at once
            await self._health.revive_now()
            return self._supervisor.plan(len(prompt_ids), snapshot)

    async def _snapshot(self, prompt_ids: list[int]) -> ClusterSnapshot | None:
        if self._cluster is None:
            return None
        try:
            return await self._cluster(prompt_ids)
        except Exception as exc:  # planning degrades to load only
            LOG.info("cluster snapshot failed: %r", exc)
            return None

    async def _execute(self, run: _Run, plan: Plan, client: ClientChannel) -> None:
        rid = uuid.uuid4().hex
        job = WorkerJob(rid, "context_and_generation", tuple(run.prompt_ids), run.req.params)
        if plan.prefill is None:
            await self._decode(run, plan.decode, job, client)
            return
        prefill_rid = await self._prefill(run, plan.prefill, job, client)
        if run.finish_reason:
            return  # the first token already ended it (EOS, stop, max_tokens=1)
        recompute = replace(job, prior_output_ids=tuple(run.output_ids))
        if prefill_rid is None:
            await self._decode(run, plan.decode, recompute, client)
            return
        decode_job = replace(recompute, request_type="generation_only", kv_handle=run.handle)
        first_tokens = len(run.output_ids)
        try:
            await self._consume(run, plan.decode, decode_job, client)
        except RequestCancelled:
            await self._workers.cancel(plan.prefill, prefill_rid)  # drops the hand-off if never pulled
            raise
        except WorkerError as exc:
            dead = await self._went_down(plan.decode, exc)
            await self._workers.cancel(plan.prefill, prefill_rid)  # drops the hand-off if never pulled
            if exc.code in (CANCELLED, INVALID_ARG) or (len(run.output_ids) > first_tokens and not dead):
                raise  # a caller's mistake is never retried
            LOG.warning("decode %s failed (%s) after %d tokens: recomputing", plan.decode, exc,
                        len(run.output_ids))
            await self._decode(run, plan.decode, replace(
                recompute, request_id=f"{rid}.r", prior_output_ids=tuple(run.output_ids)), client)

    async def _decode(self, run: _Run, model: str, job: WorkerJob, client: ClientChannel) -> None:
        """Runs ``job`` (context_and_generation) to its end on ``model``, or, if ``model`` is
        (or goes) down, on another live worker with what was generated so far as prior output."""
        if self._health is not None and self._health.is_down(model):
            model = self._supervisor.fallback(model) or model
        try:
            await self._consume(run, model, job, client)
        except WorkerError as exc:
            other = self._supervisor.fallback(model) if await self._went_down(model, exc) else None
            if other is None or run.finish_reason:
                raise
            if len(run.output_ids) >= run.req.params.max_tokens:
                run.finish_reason = "length"
                return
            LOG.warning("%s; recomputing on %s after %d tokens", exc, other, len(run.output_ids))
            resumed = replace(job, request_id=f"{job.request_id}.f", request_type="context_and_generation",
                              prior_output_ids=tuple(run.output_ids), kv_handle=b"")
            await self._consume(run, other, resumed, client)

    async def _went_down(self, model: str, exc: WorkerError) -> bool:
        """Whether ``model``, which failed with ``exc``, is down (a probe decides when due)."""
        if self._health is None or exc.code in (CANCELLED, INVALID_ARG):
            return False
        return not await self._health.alive(model)

    async def _prefill(self, run: _Run, model: str, job: WorkerJob, client: ClientChannel) -> str | None:
        """Runs context_only (one retry); the prefill's request id, or None when both failed.
        No retry once the first token reached the client (the worker sends it before its KV
        publish, which may still fail): a retry would stream it again; the caller recomputes
        on decode with it as prior output instead."""
        for attempt in range(PREFILL_ATTEMPTS):
            rid = job.request_id if attempt == 0 else f"{job.request_id}.p{attempt}"
            try:
                await self._consume(run, model, replace(job, request_id=rid, request_type="context_only"), client)
            except WorkerError as exc:
                if exc.code in (CANCELLED, INVALID_ARG):
                    raise
                LOG.warning("prefill %s failed (attempt %d): %s", model, attempt + 1, exc)
                if await self._went_down(model, exc):
                    return None  # a dead worker is not retried: recompute on decode
                if run.output_ids:
                    return None
                continue
            if run.finish_reason or run.handle:
                return rid
            LOG.warning("prefill %s handed off without a KV handle (attempt %d)", model, attempt + 1)
            if run.output_ids:
                return None
        return None

    async def _consume(self, run: _Run, model: str, job: WorkerJob, client: ClientChannel) -> None:
        """Streams ``job``'s updates into ``run`` until its final one (or a stop string). A
        watchdog beside the read (not a timed wait per update) checks every CANCEL_POLL_S for
        a client cancel and, after ``silence_s`` without an update, whether the worker lives;
        either stops the read (the worker gets a cancel; a dead worker's stream is abandoned)."""
        now = asyncio.get_running_loop().time()
        watch = _Watch(now, now)
        reader = asyncio.ensure_future(self._read(run, model, job, client, watch))
        watchdog = asyncio.ensure_future(self._watchdog(model, client, watch, reader))
        try:
            await asyncio.shield(reader)
        except asyncio.CancelledError:
            if reader.cancelled() and watch.reason == "cancelled":
                await self._workers.cancel(model, job.request_id)
                raise RequestCancelled(f"request cancelled by the client after {len(run.output_ids)} tokens") \
                    from None
            if reader.cancelled() and watch.reason == "silent":
                raise WorkerError(f"{model}: no update for {watch.silent_s:.1f} s and the worker does not "
                                  "answer (its process died?)", UNAVAILABLE) from None
            if reader.cancelled() and watch.reason == "stalled":
                with contextlib.suppress(WorkerError, asyncio.TimeoutError):  # free its KV if it can
                    await asyncio.wait_for(self._workers.cancel(model, job.request_id), CANCEL_TIMEOUT_S)
                raise WorkerError(f"{model}: no update for {watch.silent_s:.1f} s although the worker answers "
                                  f"(request {job.request_id} stalled)", UNAVAILABLE) from None
            reader.cancel()  # this request itself was cancelled: stop reading too
            raise
        finally:
            watchdog.cancel()

    async def _read(self, run: _Run, model: str, job: WorkerJob, client: ClientChannel, watch: _Watch) -> None:
        loop = asyncio.get_running_loop()
        async for update in self._workers.stream(model, job):
            watch.since = watch.updated = loop.time()
            if client.is_cancelled() and not update.final:
                watch.reason = "cancelled"
                await self._workers.cancel(model, job.request_id)
                raise RequestCancelled("request cancelled by the client")
            stopped = self._absorb(run, update, client)
            if stopped and not update.final:
                await self._workers.cancel(model, job.request_id)
                run.finish_reason = "stop"
                return
            if update.final:
                return

    async def _watchdog(self, model: str, client: ClientChannel, watch: _Watch, reader: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        health = self._health
        while not reader.done():
            await asyncio.sleep(CANCEL_POLL_S)
            if reader.done() or watch.reason:
                return
            if client.is_cancelled():
                watch.reason = "cancelled"
                reader.cancel()
                return
            if loop.time() - watch.updated >= self._stall_s:
                watch.reason, watch.silent_s = "stalled", loop.time() - watch.updated
                reader.cancel()
                return
            silent_s = loop.time() - watch.since
            if health is not None and silent_s >= health.config.silence_s:
                if not reader.done() and not await health.alive(model):
                    watch.reason, watch.silent_s = "silent", silent_s
                    reader.cancel(ABANDON)
                    return
                watch.since = loop.time()

    def _absorb(self, run: _Run, update: WorkerUpdate, client: ClientChannel) -> bool:
        """Adds an update's tokens; streams the new text. True when a stop string ended it."""
        now = time.time_ns()
        if update.new_token_ids:
            run.first_token_ns = run.first_token_ns or now
            run.last_token_ns = now
        run.output_ids.extend(update.new_token_ids)
        run.logprobs.extend(update.new_logprobs)
        run.num_cached_tokens = max(run.num_cached_tokens, update.num_cached_tokens)
        run.kv_transfer_bytes += update.kv_transfer_bytes
        run.kv_transfer_ns += update.kv_transfer_ns
        if update.finish_reason:
            run.finish_reason = update.finish_reason
        if update.context_phase_params:
            run.handle = update.context_phase_params
        delta = run.text.feed(update.new_token_ids)
        if delta.stopped:
            run.finish_reason = "stop"
        if run.req.stream:
            if update.finish_reason or delta.stopped:  # a hand-off is final for the worker only
                run.carried += delta.text  # goes out with the final response
            elif delta.text:
                client.send(self._stream_chunk(run, delta.text), final=False)
                run.sent_tokens, run.sent_logprobs = len(run.output_ids), len(run.logprobs)
        return delta.stopped

    def _stream_chunk(self, run: _Run, text: str) -> Chunk:
        return Chunk(text, "", tuple(run.logprobs[run.sent_logprobs:]),
                     len(run.output_ids) - run.sent_tokens, run.timing())

    def _final_chunk(self, run: _Run, timing: Timing) -> Chunk:
        tail = run.carried + run.text.finish().text
        reason = run.finish_reason or "length"
        if run.req.stream:
            return Chunk(tail, reason, tuple(run.logprobs[run.sent_logprobs:]),
                         len(run.output_ids) - run.sent_tokens, timing)
        text = run.text.text
        if not run.req.exclude_input_in_output:
            text = run.req.prompt + text
        return Chunk(text, reason, tuple(run.logprobs), len(run.output_ids), timing)
