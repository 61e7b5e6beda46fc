"""Choosing workers for a request: the least loaded prefill worker and decode worker.

Load is the number of requests the orchestrator has in flight on each worker (it alone sends
them work). With disaggregation off, or when no prefill worker exists, the plan is local:
one colocated worker runs context_and_generation.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one request runs. ``prefill`` is None for a local (colocated) plan."""

    prefill: str | None
    decode: str


class Supervisor:
    def __init__(self, prefill_models: list[str], decode_models: list[str], disaggregation: bool) -> None:
        if not decode_models:
            raise ValueError("decode_models: at least one decode (or colocated) worker is required")
        if disaggregation and not prefill_models:
            raise ValueError("prefill_models: disaggregation is on but no prefill worker is listed")
        self.disaggregation = disaggregation
        self._prefill = list(prefill_models)
        self._decode = list(decode_models)
        self._load: dict[str, int] = dict.fromkeys(self._prefill + self._decode, 0)
        self._lock = threading.Lock()

    def plan(self, num_prompt_tokens: int) -> Plan:
        """Least-loaded workers; ties go to the first listed. Counts the request as in flight."""
        with self._lock:
            decode = min(self._decode, key=lambda m: self._load[m])
            prefill = min(self._prefill, key=lambda m: self._load[m]) \
                if self.disaggregation and num_prompt_tokens > 0 else None
            for name in (prefill, decode):
                if name is not None:
                    self._load[name] += 1
            return Plan(prefill, decode)

    def done(self, plan: Plan) -> None:
        with self._lock:
            for name in (plan.prefill, plan.decode):
                if name is not None:
                    self._load[name] -= 1

    def load(self) -> dict[str, int]:
        with self._lock:
            return dict(self._load)
