"""Choosing workers for a request, and relabeling workers between prefill and decode.

Inputs: the requests the orchestrator has in flight on each worker (it alone sends them work),
and optionally a ``ClusterSnapshot`` from the kvbridge master: each node's load report and how
many of the prompt's full blocks each node already holds. Policy (pure functions, unit-tested):
- ``choose_worker``: among the workers whose load is within ``slack`` of the least loaded, the
  one holding the longest prefix of the prompt; ties by least load, then listing order;
- ``is_local``: colocated (no prefill hop) when disaggregation is off, no prefill worker exists,
  the decode worker already holds every full block of the prompt, or it holds the longest prefix
  of all nodes (strictly), or it ties for the longest and holds at least half the prompt (running
  there moves no KV and computes the smaller half, while a prefill node would hand the decode
  node blocks it already holds; a short shared prefix such as a system prompt, held everywhere,
  keeps requests disaggregated): the prefill then runs where the most KV is reused;
- ``rebalance``: move one worker from the idle side to the overloaded side when one side's
  mean pending load exceeds ``ratio`` times the other's (each side keeps one worker).
Worker models serve every request type; the role is only this label (see worker.py).
A worker marked down (``set_down``: its process died, worker_health.py) gets no new plan until
it is marked up: with no live prefill worker plans are local; with no live decode worker a live
prefill worker decodes; with none live at all ``plan`` raises WorkerUnavailable.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from backends.serving.errors import WorkerUnavailable

Role = Literal["prefill", "decode"]
SLACK = 2
REBALANCE_RATIO = 4.0
REBALANCE_MIN_PENDING = 8


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one request runs. ``prefill`` is None for a local (colocated) plan."""

    prefill: str | None
    decode: str


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """What the master said for one prompt: queued requests and prefix blocks held, per node."""

    num_prompt_blocks: int = 0
    queue_len: Mapping[str, int] = field(default_factory=dict)
    matched_blocks: Mapping[str, int] = field(default_factory=dict)
    block_size: int = 16


def choose_worker(candidates: Sequence[str], inflight: Mapping[str, int], cluster: ClusterSnapshot,
                  slack: int = SLACK) -> str:
    """See the module docstring; ValueError when there is no candidate."""
    if not candidates:
        raise ValueError("candidates: no worker to choose from")
    load = {m: inflight.get(m, 0) + cluster.queue_len.get(m, 0) for m in candidates}
    floor = min(load.values())
    eligible = [m for m in candidates if load[m] <= floor + slack]
    return max(eligible, key=lambda m: (cluster.matched_blocks.get(m, 0), -load[m]))


def is_local(disaggregation: bool, has_prefill: bool, decode: str, cluster: ClusterSnapshot,
             num_prompt_tokens: int = 0) -> bool:
    """See the module docstring (a later turn of a conversation: its decode node stored the
    prompt and the reply, a prefill node would recompute the reply)."""
    matched = cluster.matched_blocks
    mine = matched.get(decode, 0)
    fully_cached = 0 < cluster.num_prompt_blocks <= mine
    others = max((n for node, n in matched.items() if node != decode), default=0)
    held = mine * cluster.block_size
    tie_pays = mine == others > 0 and num_prompt_tokens - held <= held
    return not disaggregation or not has_prefill or fully_cached or mine > others or tie_pays


def rebalance(prefill: Sequence[str], decode: Sequence[str], inflight: Mapping[str, int],
              ratio: float = REBALANCE_RATIO, min_pending: int = REBALANCE_MIN_PENDING) -> tuple[str, Role] | None:
    """(worker, its new role) to even out the two sides, or None."""
    def mean(models: Sequence[str]) -> float:
        return sum(inflight.get(m, 0) for m in models) / max(len(models), 1)

    p, d = mean(prefill), mean(decode)
    if p >= min_pending and p > ratio * max(d, 1.0) and len(decode) > 1:
        return min(decode, key=lambda m: inflight.get(m, 0)), "prefill"
    if d >= min_pending and d > ratio * max(p, 1.0) and len(prefill) > 1:
        return min(prefill, key=lambda m: inflight.get(m, 0)), "decode"
    return None


class Supervisor:
    """Thread-safe plans over the current labels; ``relabel`` moves a worker between sides."""

    def __init__(self, prefill_models: list[str], decode_models: list[str], disaggregation: bool) -> None:
        if not decode_models:
            raise ValueError("decode_models: at least one decode (or colocated) worker is required")
        if disaggregation and not prefill_models:
            raise ValueError("prefill_models: disaggregation is on but no prefill worker is listed")
        self.disaggregation = disaggregation
        self._prefill = list(prefill_models)
        self._decode = list(decode_models)
        self._load: dict[str, int] = dict.fromkeys(self._prefill + self._decode, 0)
        self._down: set[str] = set()
        self._lock = threading.Lock()

    def plan(self, num_prompt_tokens: int, cluster: ClusterSnapshot | None = None) -> Plan:
        """Counts the request as in flight on the chosen workers until ``done``."""
        cluster = cluster or ClusterSnapshot()
        with self._lock:
            self._rebalance()
            prefills = [m for m in self._prefill if m not in self._down]
            decodes = [m for m in self._decode if m not in self._down] or prefills
            if not decodes:
                raise WorkerUnavailable(f"no live worker: {', '.join(sorted(self._down))} down (a worker "
                                        "process died; it is being reloaded): retry later")
            decode = choose_worker(decodes, self._load, cluster)
            prefills = [m for m in prefills if m != decode]
            prefill = None
            if num_prompt_tokens > 0 and not is_local(self.disaggregation, bool(prefills), decode, cluster,
                                                      num_prompt_tokens):
                prefill = choose_worker(prefills, self._load, cluster)
            for name in (prefill, decode):
                if name is not None:
                    self._load[name] += 1
            return Plan(prefill, decode)

    def done(self, plan: Plan) -> None:
        with self._lock:
            for name in (plan.prefill, plan.decode):
                if name is not None:
                    self._load[name] -= 1

    def set_down(self, model: str, down: bool) -> None:
        """Marks ``model`` down (no new plan uses it) or back up; ValueError if unknown."""
        with self._lock:
            if model not in self._load:
                raise ValueError(f"model: unknown worker {model!r}")
            if down:
                self._down.add(model)
            else:
                self._down.discard(model)

    def fallback(self, exclude: str) -> str | None:
        """A live worker other than ``exclude`` to recompute a request on (decode side first,
        then the least loaded), or None."""
        with self._lock:
            for side in (self._decode, self._prefill):
                live = [m for m in side if m != exclude and m not in self._down]
                if live:
                    return min(live, key=lambda m: self._load[m])
            return None

    def down(self) -> set[str]:
        with self._lock:
            return set(self._down)

    def relabel(self, model: str, role: Role) -> None:
        """Moves ``model`` to the ``role`` side; ValueError if unknown or the last of its side."""
        with self._lock:
            self._relabel(model, role)

    def _relabel(self, model: str, role: Role) -> None:
        src, dst = (self._decode, self._prefill) if role == "prefill" else (self._prefill, self._decode)
        if model in dst:
            return
        if model not in src:
            raise ValueError(f"model: unknown worker {model!r}")
        if len(src) == 1:
            raise ValueError(f"model: {model!r} is the last {'decode' if role == 'prefill' else 'prefill'} worker")
        src.remove(model)
        dst.append(model)

    def _rebalance(self) -> None:
        if self.disaggregation:
            move = rebalance(self._prefill, self._decode, self._load)
            if move is not None:
                self._relabel(*move)

    def roles(self) -> dict[str, Role]:
        with self._lock:
            return {**{m: "prefill" for m in self._prefill}, **{m: "decode" for m in self._decode}}

    def load(self) -> dict[str, int]:
        with self._lock:
            return dict(self._load)
