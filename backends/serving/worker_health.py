"""Whether a worker model still answers: the bound on a wait for a dead worker (issue 8).

What python_backend 2.51 (r24.10) does when a worker's stub process dies: nothing for the
requests it had in flight (their BLS response iterators never get another response, not even
after the model is reloaded); the model stays READY; only a *new* request fails, after about
1-2 s, with "Stub process '<instance>' is not healthy." (python_be.cc ``SendMessageToStub`` /
``ReceiveMessageFromStub``; it restarts non-decoupled stubs only, and our workers are decoupled).

So the orchestrator asks. A request that has waited ``silence_s`` for its worker's next update
calls ``alive(model)``: a probe (a cancel job for an id nobody uses, which the worker answers
from its ``execute`` at once, whatever its engine is doing) that must end within
``probe_timeout_s``. One probe per model at a time, shared by every waiter; a success is good
for ``silence_s``. A failed probe marks the model down (``on_change(model, True)``: the
Supervisor stops planning on it) and the waiter abandons its stream; a request therefore learns
that its worker died at most ``bound_s`` after the worker's last update. ``revive()`` re-probes
down models (each at most every ``silence_s``) and marks them up once they answer again, e.g.
after the launcher reloaded them. Event loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger(__name__)
# The message of a task.cancel() that abandons a worker stream: its worker is gone, so the
# stream must not wait for (drain) a final response that will never come (bls.BlsWorkers).
ABANDON = "pd-abandon: the worker stopped answering"
PROBE_PREFIX = "pd-probe-"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """``silence_s``: how long a request waits for its worker's next update before asking
    whether the worker is alive; ``probe_timeout_s``: how long that question may take."""

    silence_s: float = 2.0
    probe_timeout_s: float = 8.0

    def __post_init__(self) -> None:
        if not self.silence_s > 0 or not self.probe_timeout_s > 0:
            raise ValueError(f"worker_silence_s/worker_probe_timeout_s: expected > 0, got "
                             f"{self.silence_s}/{self.probe_timeout_s}")

    @property
    def bound_s(self) -> float:
        """The longest a request waits on a dead worker before it is told."""
        return self.silence_s + self.probe_timeout_s


Probe = Callable[[str, str], Coroutine[Any, Any, None]]  # (model, request id): a cancel job


class WorkerHealth:
    """Per-model liveness from probes; see the module docstring."""

    def __init__(self, probe: Probe, config: HealthConfig = HealthConfig(),
                 on_change: Callable[[str, bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._probe = probe
        self._on_change = on_change
        self._clock = clock
        self._down: dict[str, float] = {}  # model -> when its last probe failed
        self._answered: dict[str, float] = {}  # model -> when its last probe succeeded
        self._probes: dict[str, asyncio.Task[bool]] = {}

    def is_down(self, model: str) -> bool:
        return model in self._down

    async def alive(self, model: str) -> bool:
        """False at once for a down model; True at once if it answered within ``silence_s``;
        otherwise the (shared) probe's answer."""
        if model in self._down:
            return False
        if self._clock() - self._answered.get(model, float("-inf")) < self.config.silence_s:
            return True
        return await asyncio.shield(self._start(model))

    def revive(self) -> None:
        """Starts a probe of each down model whose last one failed ``silence_s`` ago (returns at once)."""
        now = self._clock()
        for model, since in list(self._down.items()):
            if now - since >= self.config.silence_s:
                self._start(model)

    async def revive_now(self) -> None:
        """Probes every down model now and waits for the answers (when no worker is up)."""
        await asyncio.gather(*(asyncio.shield(self._start(m)) for m in list(self._down)))

    def _start(self, model: str) -> asyncio.Task[bool]:
        task = self._probes.get(model)
        if task is None:
            task = asyncio.ensure_future(self._run_probe(model))
            self._probes[model] = task
        return task

    async def _run_probe(self, model: str) -> bool:
        send = asyncio.ensure_future(self._probe(model, f"{PROBE_PREFIX}{uuid.uuid4().hex}"))
        reason = ""
        try:
            done, _ = await asyncio.wait({send}, timeout=self.config.probe_timeout_s)
            if not done:
                send.cancel(ABANDON)
                reason = f"no answer within {self.config.probe_timeout_s:g} s"
            elif send.exception() is not None:
                reason = str(send.exception())
        finally:
            del self._probes[model]
        self._record(model, reason)
        return not reason

    def _record(self, model: str, reason: str) -> None:
        now = self._clock()
        if not reason:
            self._answered[model] = now
            if self._down.pop(model, None) is not None:
                LOG.warning("worker %s answers again: back in service", model)
                self._notify(model, False)
            return
        was_down = model in self._down
        self._down[model] = now
        if not was_down:
            LOG.warning("worker %s is down (probe: %s)", model, reason)
            self._notify(model, True)

    def _notify(self, model: str, down: bool) -> None:
        if self._on_change is not None:
            self._on_change(model, down)
