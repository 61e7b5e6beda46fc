"""The pd_orchestrator service: tokenize, plan, prefill → first token → decode stream.

One coroutine per request (``Orchestrator.handle``); requests never wait on each other. Workers
are reached through a WorkerClient (BLS inside Triton). The first token is sent to the client
as soon as the prefill worker returns it; the decode worker then streams the rest. Text is
produced by a TextStream (UTF-8-safe, stop strings). If the client cancels, a ``cancel`` job
goes to the worker that holds the request and the client gets CANCELLED.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from backends.serving.detokenize import TextStream
from backends.serving.errors import RequestCancelled
from backends.serving.public_io import Chunk, Timing
from backends.serving.requests import GenerateRequest
from backends.serving.supervisor import Plan, Supervisor
from backends.serving.worker_io import WorkerJob, WorkerUpdate


class WorkerClient(Protocol):
    def stream(self, model: str, job: WorkerJob) -> AsyncIterator[WorkerUpdate]: ...
    async def cancel(self, model: str, request_id: str) -> None: ...


class ClientChannel(Protocol):
    """The public request's side: where chunks go, and whether the client gave up."""

    def send(self, chunk: Chunk, final: bool) -> None: ...
    def is_cancelled(self) -> bool: ...


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
                 max_model_len: int) -> None:
        self._tokenizer = tokenizer
        self._supervisor = supervisor
        self._workers = workers
        self._max_model_len = max_model_len

    def tokenize(self, req: GenerateRequest) -> list[int]:
        ids = list(self._tokenizer.encode(req.prompt))
        if len(ids) + req.params.max_tokens > self._max_model_len:
            raise ValueError(
                f"text_input: prompt has {len(ids)} tokens; with max_tokens={req.params.max_tokens} "
                f"that exceeds max_model_len={self._max_model_len}")
        return ids

    async def handle(self, req: GenerateRequest, client: ClientChannel) -> Timing:
        """Runs one request to its final chunk; raises (ValueError, RequestCancelled, ...) otherwise."""
        arrival_ns = time.time_ns()
        prompt_ids = self.tokenize(req)
        run = _Run(req, prompt_ids, TextStream(self._tokenizer, req.params.stop, prompt_ids), arrival_ns)
        plan = self._supervisor.plan(len(prompt_ids))
        try:
            await self._execute(run, plan, client)
        finally:
            self._supervisor.done(plan)
        timing = run.timing()
        client.send(self._final_chunk(run, timing), final=True)
        return timing

    async def _execute(self, run: _Run, plan: Plan, client: ClientChannel) -> None:
        rid = uuid.uuid4().hex
        job = WorkerJob(rid, "context_and_generation", tuple(run.prompt_ids), run.req.params)
        if plan.prefill is None:
            await self._consume(run, plan.decode, job, client)
            return
        await self._consume(run, plan.prefill, replace(job, request_type="context_only"), client)
        if run.finish_reason:
            return  # the first token already ended it (EOS, stop, max_tokens=1)
        if not run.handle:
            raise RuntimeError(f"prefill worker {plan.prefill} handed off without a KV handle")
        decode_job = replace(job, request_type="generation_only", prior_output_ids=tuple(run.output_ids),
                             kv_handle=run.handle)
        await self._consume(run, plan.decode, decode_job, client)

    async def _consume(self, run: _Run, model: str, job: WorkerJob, client: ClientChannel) -> None:
        async for update in self._workers.stream(model, job):
            if client.is_cancelled():
                await self._workers.cancel(model, job.request_id)
                raise RequestCancelled(f"request cancelled by the client after {len(run.output_ids)} tokens")
            stopped = self._absorb(run, update, client)
            if stopped and not update.final:
                await self._workers.cancel(model, job.request_id)
                run.finish_reason = "stop"
                return
            if update.final:
                return

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
            if update.final or delta.stopped:
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
