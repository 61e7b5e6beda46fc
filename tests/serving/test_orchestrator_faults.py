"""Orchestrator faults: prefill retry then recompute on decode, decode fallback, cancellation.

The workers are scripted (the WorkerClient boundary); the orchestrator's control flow is what
is under test, with the real Supervisor, TextStream and byte-level tokenizer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from backends.serving.errors import RequestCancelled, WorkerError
from backends.serving.orchestrator import Orchestrator
from backends.serving.public_io import Chunk
from backends.serving.requests import GenerateRequest
from backends.serving.supervisor import Supervisor
from backends.serving.worker_io import WorkerJob, WorkerUpdate

TOK = byte_level_tokenizer()
HANDLE = b"handle-bytes"


def tokens(text: str) -> tuple[int, ...]:
    return tuple(TOK.encode(text))


def update(text: str, final: bool = False, reason: str = "", handle: bytes = b"") -> WorkerUpdate:
    return WorkerUpdate(tokens(text), (), final, reason, 5, 0, 0, handle, 100 if handle else 0)


@dataclass
class ScriptedWorkers:
    """Per (model, request_type): a list of scripts (one per call), each updates or an error."""

    scripts: dict[tuple[str, str], list[list[WorkerUpdate | WorkerError | None] | WorkerError]]
    jobs: list[tuple[str, WorkerJob]] = field(default_factory=list)
    cancels: list[tuple[str, str]] = field(default_factory=list)

    async def stream(self, model: str, job: WorkerJob) -> AsyncIterator[WorkerUpdate]:
        self.jobs.append((model, job))
        script = self.scripts[(model, job.request_type)].pop(0)
        if isinstance(script, WorkerError):
            raise script
        for item in script:
            await asyncio.sleep(0.01)
            if isinstance(item, WorkerError):  # a failure after the updates before it
                raise item
            if item is None:  # the stream stalls: no further update, ever
                await asyncio.Event().wait()
            else:
                yield item

    async def cancel(self, model: str, request_id: str) -> None:
        self.cancels.append((model, request_id))


@dataclass
class Channel:
    chunks: list[tuple[Chunk, bool]] = field(default_factory=list)
    cancel_after: int = -1

    def send(self, chunk: Chunk, final: bool) -> None:
        self.chunks.append((chunk, final))

    def is_cancelled(self) -> bool:
        return 0 <= self.cancel_after <= len(self.chunks)


def run(workers: ScriptedWorkers, channel: Channel, stream: bool = True, stall_s: float = 60.0) -> None:
    orch = Orchestrator(TOK, Supervisor(["prefill"], ["decode"], True), workers, 512, stall_s=stall_s)
    req = GenerateRequest("llm", "hello", SamplingParams(max_tokens=4, temperature=0.0), stream, True)
    asyncio.run(orch.handle(req, channel))


def texts(channel: Channel) -> list[str]:
    return [c.text for c, _ in channel.chunks]


def test_prefill_retried_once_then_handed_off() -> None:
    workers = ScriptedWorkers({
        ("prefill", "context_only"): [WorkerError("prefill: boom", "INTERNAL"), [update("A", True, handle=HANDLE)]],
        ("decode", "generation_only"): [[update("B"), update("C"), update("D", True, "length")]]})
    channel = Channel()
    run(workers, channel)
    assert texts(channel) == ["A", "B", "C", "D"]
    rid = workers.jobs[0][1].request_id
    assert [(m, j.request_type, j.request_id) for m, j in workers.jobs] == [
        ("prefill", "context_only", rid), ("prefill", "context_only", f"{rid}.p1"),
        ("decode", "generation_only", rid)]
    assert workers.jobs[2][1].kv_handle == HANDLE and workers.jobs[2][1].prior_output_ids == tokens("A")


def test_prefill_failing_after_its_first_token_is_not_retried() -> None:
    """The worker sends the first token before its KV publish; if the publish then fails, a
    retry would stream that token again: the request is recomputed on decode with it instead."""
    workers = ScriptedWorkers({
        ("prefill", "context_only"): [[update("A"), WorkerError("prefill: publish failed", "INTERNAL")]],
        ("decode", "context_and_generation"): [[update("B"), update("C", True, "length")]]})
    channel = Channel()
    run(workers, channel)
    assert texts(channel) == ["A", "B", "C"]
    assert [(m, j.request_type) for m, j in workers.jobs] == [
        ("prefill", "context_only"), ("decode", "context_and_generation")]
    assert workers.jobs[1][1].prior_output_ids == tokens("A")


def test_prefill_failing_twice_recomputes_on_decode() -> None:
    workers = ScriptedWorkers({
        ("prefill", "context_only"): [WorkerError("p: down", "UNAVAILABLE"), WorkerError("p: down", "UNAVAILABLE")],
        ("decode", "context_and_generation"): [[update("W"), update("XYZ", True, "length")]]})
    channel = Channel()
    run(workers, channel)
    assert texts(channel) == ["W", "XYZ"]
    assert channel.chunks[-1][0].finish_reason == "length" and channel.chunks[-1][1]
    assert [j.request_type for _, j in workers.jobs] == ["context_only", "context_only", "context_and_generation"]


def test_decode_failing_before_its_first_token_recomputes_with_the_first_token() -> None:
    workers = ScriptedWorkers({
        ("prefill", "context_only"): [[update("A", True, handle=HANDLE)]],
        ("decode", "generation_only"): [WorkerError("decode: pull", "INTERNAL")],
        ("decode", "context_and_generation"): [[update("B"), update("CD", True, "length")]]})
    channel = Channel()
    run(workers, channel)
    assert texts(channel) == ["A", "B", "CD"]
    rid = workers.jobs[0][1].request_id
    model, job = workers.jobs[-1]
    assert (model, job.request_type, job.request_id, job.prior_output_ids) == (
        "decode", "context_and_generation", f"{rid}.r", tokens("A"))
    assert workers.cancels == [("prefill", rid)]  # the unpulled hand-off is dropped


def test_invalid_arg_from_prefill_is_not_retried() -> None:
    workers = ScriptedWorkers({("prefill", "context_only"): [WorkerError("prefill: max_tokens", "INVALID_ARG")]})
    with pytest.raises(WorkerError, match="^prefill: max_tokens$"):
        run(workers, Channel())
    assert len(workers.jobs) == 1


def test_cancel_mid_decode_reaches_decode_and_prefill() -> None:
    workers = ScriptedWorkers({
        ("prefill", "context_only"): [[update("A", True, handle=HANDLE)]],
        ("decode", "generation_only"): [[update("B"), update("C"), update("D"), update("E", True, "length")]]})
    channel = Channel(cancel_after=2)
    with pytest.raises(RequestCancelled):
        run(workers, channel)
    rid = workers.jobs[0][1].request_id
    assert texts(channel) == ["A", "B"]
    assert workers.cancels == [("decode", rid), ("prefill", rid)]


def test_a_stalled_stream_ends_with_an_error_within_the_stall_bound() -> None:
    """The worker keeps answering (no health probe fails) but this request's stream makes no
    progress: after stall_s the request gets an UNAVAILABLE error and the worker a cancel,
    instead of waiting forever."""
    workers = ScriptedWorkers({
        ("prefill", "context_only"): [[update("A", True, handle=HANDLE)]],
        ("decode", "generation_only"): [[update("B"), None]]})
    channel = Channel()
    with pytest.raises(WorkerError, match=r"^decode: no update for [0-9.]+ s although the worker answers \(request "
                                          r"[0-9a-f]+ stalled\)$") as info:
        run(workers, channel, stall_s=0.3)
    assert info.value.code == "UNAVAILABLE"
    rid = workers.jobs[0][1].request_id
    assert texts(channel) == ["A", "B"]
    assert workers.cancels == [("decode", rid), ("prefill", rid)]
