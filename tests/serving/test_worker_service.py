"""WorkerService (backends/serving/worker.py) on a real tiny engine: a cancel job is answered by
the engine thread once the abort is applied, so a worker whose engine thread is stuck does not
look alive to the orchestrator's probe (a cancel of an unused id, worker_health.py); and every
job queued when the service closes still gets a final answer."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest
from queue_sink import QueueSink

from backends.engine.engine import LLMEngine
from backends.engine.sampling_params import SamplingParams
from backends.serving.errors import RequestCancelled
from backends.serving.worker import WorkerService
from backends.serving.worker_io import WorkerJob, WorkerUpdate

LONG = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


@pytest.fixture
def wedged() -> Any:
    """A tiny engine whose step blocks while ``gate`` is clear (a stuck engine thread);
    ``stuck`` is set once the engine thread waits there."""
    engine = LLMEngine("tiny-llama")
    gate, stuck = threading.Event(), threading.Event()
    gate.set()
    step = engine.step

    def gated_step() -> Any:
        if not gate.is_set():
            stuck.set()
            gate.wait(timeout=30)
        return step()

    engine.step = gated_step  # type: ignore[method-assign]
    return engine, gate, stuck


def test_a_cancel_is_answered_only_once_the_engine_thread_applied_it(wedged: Any) -> None:
    engine, gate, stuck = wedged
    service = WorkerService(engine, "both")
    try:
        running = QueueSink()
        service.submit(WorkerJob("r", "context_and_generation", (5, 6, 7, 8), LONG), running)
        first = running.items.get(timeout=30)  # the engine thread is stepping it
        assert isinstance(first, WorkerUpdate)
        gate.clear()  # the engine thread now hangs inside its next step
        assert stuck.wait(timeout=10)
        probe = QueueSink()
        service.submit(WorkerJob("never-seen", "cancel"), probe)
        with pytest.raises(queue.Empty):
            probe.final(timeout_s=1.0)
        gate.set()
        answer = probe.final(timeout_s=10)
        assert isinstance(answer, WorkerUpdate) and answer.new_token_ids == ()
        cancel = QueueSink()
        service.submit(WorkerJob("r", "cancel"), cancel)
        assert isinstance(cancel.final(timeout_s=10), WorkerUpdate)
        ended = running.final(timeout_s=10)  # the sink makes it a final update if data went out
        assert isinstance(ended, RequestCancelled) and str(ended) == "request cancelled"
    finally:
        gate.set()
        service.close()


def test_jobs_queued_at_close_get_a_final_answer(wedged: Any) -> None:
    engine, gate, stuck = wedged
    service = WorkerService(engine, "both")
    running = QueueSink()
    service.submit(WorkerJob("r", "context_and_generation", (5, 6, 7, 8), LONG), running)
    assert isinstance(running.items.get(timeout=30), WorkerUpdate)
    gate.clear()
    assert stuck.wait(timeout=10)
    closer = threading.Thread(target=service.close)
    closer.start()  # queues "close" behind the running step
    late, probe = QueueSink(), QueueSink()
    service.submit(WorkerJob("late", "context_and_generation", (1, 2, 3), LONG), late)
    service.submit(WorkerJob("unused", "cancel"), probe)
    gate.set()
    closer.join(timeout=30)
    assert "shutting down" in str(running.final(timeout_s=10))
    assert "shutting down" in str(late.final(timeout_s=10))
    assert isinstance(probe.final(timeout_s=10), WorkerUpdate)
