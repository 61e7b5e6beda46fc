"""Dead workers: WorkerHealth's probes, and the orchestrator's bounded wait on a silent worker.

The workers are scripted at the WorkerClient boundary (a dead stub = a stream that never yields
again and a probe that fails or never answers, which is what python_backend 2.51 gives); the
real WorkerHealth, Orchestrator, Supervisor, TextStream and byte-level tokenizer are under test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from backends.serving.errors import WorkerError, WorkerUnavailable
from backends.serving.orchestrator import Orchestrator
from backends.serving.public_io import Chunk
from backends.serving.requests import GenerateRequest
from backends.serving.supervisor import Plan, Supervisor
from backends.serving.worker_health import ABANDON, PROBE_PREFIX, HealthConfig, WorkerHealth
from backends.serving.worker_io import WorkerJob, WorkerUpdate

TOK = byte_level_tokenizer()
FAST = HealthConfig(silence_s=0.2, probe_timeout_s=0.3)
HANDLE = b"handle"


def update(text: str, final: bool = False, reason: str = "", handle: bytes = b"") -> WorkerUpdate:
    return WorkerUpdate(tuple(TOK.encode(text)), (), final, reason, 5, 0, 0, handle, 0)


@dataclass
class Workers:
    """Per (model, request_type) a list of scripts; a script ending in None goes silent for
    good (a dead stub). Models in ``dead`` fail probes with the stub's error; in ``hung``
    probes never answer."""

    scripts: dict[tuple[str, str], list[list[WorkerUpdate | None]]]
    dead: set[str] = field(default_factory=set)
    hung: set[str] = field(default_factory=set)
    jobs: list[tuple[str, WorkerJob]] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)

    async def stream(self, model: str, job: WorkerJob) -> AsyncIterator[WorkerUpdate]:
        self.jobs.append((model, job))
        for item in self.scripts[(model, job.request_type)].pop(0):
            if item is None:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError as exc:
                    self.abandoned.append(f"{model}:{exc.args[0] if exc.args else ''}")
                    raise
            await asyncio.sleep(0.01)
            yield item  # type: ignore[misc]

    async def cancel(self, model: str, request_id: str) -> None:
        if not request_id.startswith(PROBE_PREFIX):
            return
        self.probes.append(model)
        await asyncio.sleep(0.01)
        if model in self.hung:
            await asyncio.sleep(3600)
        if model in self.dead:
            raise WorkerError(f"{model}: Stub process '{model}_0_0' is not healthy.", "INTERNAL")


@dataclass
class Channel:
    chunks: list[tuple[Chunk, bool]] = field(default_factory=list)

    def send(self, chunk: Chunk, final: bool) -> None:
        self.chunks.append((chunk, final))

    def is_cancelled(self) -> bool:
        return False


def orchestrator(workers: Workers, prefill: list[str], decode: list[str]) -> tuple[Orchestrator, Supervisor]:
    supervisor = Supervisor(prefill, decode, bool(prefill))
    health = WorkerHealth(workers.cancel, FAST, on_change=supervisor.set_down)
    return Orchestrator(TOK, supervisor, workers, 512, health=health), supervisor


def generate(orch: Orchestrator, max_tokens: int = 6) -> Channel:
    channel = Channel()
    req = GenerateRequest("llm", "hello", SamplingParams(max_tokens=max_tokens, temperature=0.0), True, True)
    asyncio.run(orch.handle(req, channel))
    return channel


def texts(channel: Channel) -> list[str]:
    return [c.text for c, _ in channel.chunks]


def test_probes_are_shared_cached_and_mark_down_and_up() -> None:
    workers = Workers({})
    changes: list[tuple[str, bool]] = []
    now = [0.0]
    health = WorkerHealth(workers.cancel, FAST, on_change=lambda m, d: changes.append((m, d)), clock=lambda: now[0])

    async def scenario() -> list[object]:
        first = await asyncio.gather(health.alive("d"), health.alive("d"))
        cached = await health.alive("d")  # answered 0 s ago: no probe
        workers.dead.add("d")
        now[0] = 0.2
        dead = await health.alive("d")
        now[0] = 0.3
        health.revive()  # failed 0.1 s ago: not due
        await asyncio.sleep(0.05)
        workers.dead.discard("d")
        now[0] = 0.4
        health.revive()
        await asyncio.sleep(0.05)
        return [first, cached, dead, health.is_down("d")]

    assert asyncio.run(scenario()) == [[True, True], True, False, False]
    assert workers.probes == ["d", "d", "d"]
    assert changes == [("d", True), ("d", False)]


def test_a_probe_without_answer_is_abandoned_and_marks_down() -> None:
    workers = Workers({}, hung={"d"})
    health = WorkerHealth(workers.cancel, FAST)
    start = time.monotonic()
    assert asyncio.run(health.alive("d")) is False
    assert FAST.probe_timeout_s <= time.monotonic() - start < FAST.probe_timeout_s + 0.2
    assert health.is_down("d")


def test_silent_decode_is_detected_and_resumed_on_the_prefill_worker() -> None:
    workers = Workers({
        ("prefill", "context_only"): [[update("A", True, handle=HANDLE)]],
        ("decode", "generation_only"): [[update("B"), update("C"), None]],
        ("prefill", "context_and_generation"): [[update("D"), update("EF", True, "length")]]},
        dead={"decode"})
    orch, supervisor = orchestrator(workers, ["prefill"], ["decode"])
    start = time.monotonic()
    channel = generate(orch)
    elapsed = time.monotonic() - start
    assert texts(channel) == ["A", "B", "C", "D", "EF"]
    assert channel.chunks[-1][0].finish_reason == "length" and channel.chunks[-1][1]
    assert workers.abandoned == [f"decode:{ABANDON}"]
    rid = workers.jobs[0][1].request_id
    model, job = workers.jobs[-1]
    assert (model, job.request_type, job.request_id, job.prior_output_ids, job.kv_handle) == (
        "prefill", "context_and_generation", f"{rid}.r", tuple(TOK.encode("ABC")), b"")
    assert elapsed < FAST.bound_s + 0.5
    assert supervisor.down() == {"decode"}
    assert supervisor.plan(3) == Plan(None, "prefill")  # the prefill worker decodes meanwhile


def test_silent_only_worker_ends_the_request_with_an_error_within_the_bound() -> None:
    workers = Workers({("worker", "context_and_generation"): [[update("A"), None]]}, dead={"worker"})
    orch, supervisor = orchestrator(workers, [], ["worker"])
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"^worker: no update for 0\.[23] s and the worker does not "
                                          r"answer \(its process died\?\)$") as info:
        generate(orch)
    assert info.value.code == "UNAVAILABLE"
    assert time.monotonic() - start < FAST.bound_s + 0.5
    with pytest.raises(WorkerUnavailable, match=r"^no live worker: worker down \(a worker process died; "
                                                r"it is being reloaded\): retry later$"):
        supervisor.plan(3)


def test_a_down_worker_answering_again_is_planned_on_again() -> None:
    workers = Workers({("worker", "context_and_generation"): [[update("A"), None], [update("XY", True, "length")]]},
                      dead={"worker"})
    orch, supervisor = orchestrator(workers, [], ["worker"])
    with pytest.raises(WorkerError):
        generate(orch)
    workers.dead.clear()  # reloaded
    time.sleep(FAST.silence_s)
    assert texts(generate(orch)) == ["XY"]  # every worker down: the plan probes first
    assert supervisor.down() == set()


def test_dead_prefill_is_not_retried_and_later_plans_are_local() -> None:
    workers = Workers({
        ("prefill", "context_only"): [[None]],
        ("decode", "context_and_generation"): [[update("AB", True, "length")], [update("CD", True, "length")]]},
        dead={"prefill"})
    orch, supervisor = orchestrator(workers, ["prefill"], ["decode"])
    assert texts(generate(orch, max_tokens=2)) == ["AB"]
    assert [(m, j.request_type) for m, j in workers.jobs] == [
        ("prefill", "context_only"), ("decode", "context_and_generation")]
    assert texts(generate(orch, max_tokens=2)) == ["CD"]
    assert [m for m, _ in workers.jobs[2:]] == ["decode"]
    assert supervisor.down() == {"prefill"}
