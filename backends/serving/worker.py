"""The pd_worker service: one LLMEngine, its engine thread and a response thread.

Threads and ownership: only the engine thread touches the engine. ``submit`` and ``close`` put
commands on a queue; the engine thread adds requests, steps the engine and hands each result to
the response thread (worker_responses.Responder), which alone calls the sinks (Triton response
senders) and polls them for client cancels, which come back to the engine thread as aborts.
Every request ends with exactly one final response: its last tokens, a hand-off (prefill), or
an error (CANCELLED after abort, INVALID_ARG for a bad request, INTERNAL/UNAVAILABLE otherwise).
The role (prefill | decode | both) is a label for the Supervisor, which may relabel a worker:
every worker with a KV transport serves every request type. A generation_only request's KV
source is closed when the request ends; its pull time rides on its first response.
``num_cached_tokens`` counts prompt tokens reused from this worker's own prefix cache: 0 for
generation_only, whose imported KV is a transfer (the orchestrator sums hits into metrics).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from backends.engine.outputs import KVExport, RequestOutput
from backends.serving.errors import RequestCancelled, WorkerUnavailable
from backends.serving.worker_io import CANCEL_ACK, WorkerJob, WorkerUpdate
from backends.serving.worker_responses import Responder, ResponseSink

LOG = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05


@dataclass(frozen=True, slots=True)
class PublishedKV:
    """A prefill's KV, now owned by the transport: the handle bytes and what moved."""

    handle: bytes
    num_bytes: int
    elapsed_ns: int


class KVTransfer(Protocol):
    """kvbridge as the worker sees it (engine thread only): publish a prefill's KV; open an
    import by handle (ValueError for a bad handle); ``maintain`` runs on every loop turn;
    ``discard`` drops a published KV whose consumer will never come (cancelled)."""

    def publish(self, export: KVExport, prompt_ids: Sequence[int]) -> PublishedKV: ...
    def source(self, handle: bytes) -> Any: ...  # an engine KVSource with elapsed_ns, close()
    def maintain(self) -> None: ...
    def discard(self, request_id: str) -> None: ...
    def find_remote(self, prompt_ids: Sequence[int]) -> Any: ...  # any thread; None: no remote prefix
    def prefix_source(self, request_id: str, prompt_ids: Sequence[int], remote: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class WorkerStats:
    num_free_blocks: int
    num_total_blocks: int
    num_running: int
    num_waiting: int = 0
    kv_imports: tuple[tuple[str, int], ...] = ()  # completed KV imports by path (device, host)


@dataclass(slots=True)
class _Active:
    job: WorkerJob
    sink: ResponseSink
    kv_source: Any = None
    remote: Any = None  # another node holding a longer prefix of the prompt (kvbridge NodeMatch)


class WorkerService:
    """Serves WorkerJobs on one engine. ``close()`` aborts what runs and joins both threads."""

    def __init__(self, engine: Any, role: str, kv: KVTransfer | None = None, stream_interval: int = 1) -> None:
        self._engine = engine
        self.role = role
        self._kv = kv
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._active: dict[str, _Active] = {}
        self._closed = False
        self._aborted: set[str] = set()
        self.stats = self._read_stats()
        self._responder = Responder(lambda rid: self._commands.put(("abort", rid)), stream_interval)
        self._engine_thread = threading.Thread(target=self._engine_loop, name="pd-engine", daemon=True)
        self._engine_thread.start()

    def submit(self, job: WorkerJob, sink: ResponseSink) -> None:
        """Queue ``job``; its responses go to ``sink``. Cancel jobs answer at once."""
        if job.request_type == "cancel":  # answered by the engine thread once applied (a liveness probe)
            self._commands.put(("cancel", (job.request_id, sink)))
            return
        remote = None
        if self._kv is not None and job.request_type != "generation_only":
            remote = self._kv.find_remote(job.prompt_ids)  # the master's answer, off the engine thread
        self._commands.put(("add", _Active(job, sink, remote=remote)))

    def close(self, timeout_s: float = 10.0) -> None:
        self._commands.put(("close", None))
        self._engine_thread.join(timeout_s)
        self._responder.close(timeout_s)

    def _engine_loop(self) -> None:
        while not self._closed:
            self._drain_commands(block=not self._engine.has_unfinished())
            if self._engine.has_unfinished() or self._aborted:
                self._step()
            if self._kv is not None:
                self._maintain_kv()
        for rid in list(self._active):
            self._finish_error(rid, WorkerUnavailable("worker is shutting down"))
        self._answer_queued()
        self._engine.close()  # its KV import threads (cancels imports still in flight)

    def _drain_commands(self, block: bool) -> None:
        try:
            kind, arg = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
            while True:
                self._apply(kind, arg)
                kind, arg = self._commands.get_nowait()
        except queue.Empty:
            return

    def _maintain_kv(self) -> None:
        try:
            self._kv.maintain()  # type: ignore[union-attr]
        except Exception:
            LOG.exception("KV maintenance failed")

    def _apply(self, kind: str, arg: Any) -> None:
        if kind == "close":
            self._closed = True
        elif kind == "abort":
            self._cancel(arg)
        elif kind == "cancel":
            rid, sink = arg
            self._cancel(rid)
            self._responder.send(rid, sink, CANCEL_ACK)
        elif kind == "add":
            self._add(arg)

    def _cancel(self, rid: str) -> None:
        if rid in self._active:
            self._abort(rid)
        elif self._kv is not None:
            self._kv.discard(rid)  # a prefill already handed off: its KV's consumer is gone

    def _answer_queued(self) -> None:
        """After the loop: every job still queued gets its final answer (nothing is left waiting)."""
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "cancel":
                self._responder.send(arg[0], arg[1], CANCEL_ACK)
            elif kind == "add":
                self._responder.fail(arg.job.request_id, arg.sink, WorkerUnavailable("worker is shutting down"))

    def _add(self, active: _Active) -> None:
        job = active.job
        if job.request_id in self._active:
            self._responder.fail(job.request_id, active.sink,
                                 ValueError(f"request id {job.request_id!r} is already running"))
            return
        kv_source = None
        try:
            if job.request_type == "generation_only":
                if self._kv is None:
                    raise WorkerUnavailable("generation_only needs a KV transport; none is configured")
                kv_source = self._kv.source(job.kv_handle)
            elif active.remote is not None and self._kv is not None:
                kv_source = self._kv.prefix_source(job.request_id, job.prompt_ids, active.remote)
            self._engine.add_request(
                job.request_id, list(job.prompt_ids), job.params,
                prefill_only=job.request_type == "context_only", kv_source=kv_source,
                prior_output_ids=list(job.prior_output_ids))
        except Exception as exc:  # ValueError → INVALID_ARG for this request only
            _close_source(kv_source)
            self._responder.fail(job.request_id, active.sink, exc)
            return
        active.kv_source = kv_source
        self._active[job.request_id] = active
        self._responder.watch(job.request_id, active.sink)

    def _abort(self, rid: str) -> None:
        if rid not in self._aborted:
            self._aborted.add(rid)
            self._engine.abort(rid)

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as exc:
            LOG.exception("engine step failed")
            for rid in list(self._active):
                self._engine.abort(rid)
                self._aborted.discard(rid)
                self._finish_error(rid, RuntimeError(f"engine step failed: {exc}"))
            return
        for out in outputs:
            self._route(out)
        for rid in self._aborted:  # an abort whose final output the engine did not report
            self._finish_error(rid, RequestCancelled("request cancelled"))
        self._aborted.clear()
        self.stats = self._read_stats()

    def _route(self, out: RequestOutput) -> None:
        active = self._active.get(out.request_id)
        if active is None:
            return
        if out.finish_reason == "abort":
            self._finish_error(out.request_id, RequestCancelled("request cancelled"))
            return
        pull_bytes, pull_ns = self._pulled(active)
        # Prefix-cache hits only: a generation_only request's prompt KV was imported from its
        # prefill (the engine counts it as cached), not reused from this node's store.
        cached = 0 if active.job.request_type == "generation_only" else out.num_cached_tokens
        update = WorkerUpdate(
            out.new_token_ids, out.new_logprobs, out.finished, out.finish_reason or "",
            out.num_prompt_tokens, out.num_output_tokens, cached, kv_transfer_bytes=pull_bytes,
            kv_transfer_ns=pull_ns)
        if active.job.request_type == "context_only" and out.finished and out.finish_reason is None:
            # The first token goes out before the KV publish (the response thread sends it
            # while this thread publishes); the hand-off follows as the final response.
            self._responder.send(out.request_id, active.sink, replace(update, final=False))
            try:
                published = self._hand_off(out)
            except Exception as exc:
                self._finish_error(out.request_id, exc)
                return
            # The publish is a copy into this node's pool: its time counts toward the transfer,
            # its bytes do not (the consumer reports the bytes it pulls: the blocks it lacked).
            update = WorkerUpdate((), (), True, "", out.num_prompt_tokens, out.num_output_tokens, cached,
                                  published.handle, 0, published.elapsed_ns)
        elif active.job.request_type == "context_only" and out.finished:
            self._release(out.request_id)  # the first token ended it: nothing to hand off
        if out.finished:
            del self._active[out.request_id]
            _close_source(active.kv_source)
        self._responder.send(out.request_id, active.sink, update)

    @staticmethod
    def _pulled(active: _Active) -> tuple[int, int]:
        """The KV pull's bytes moved (only the blocks this node lacked) and duration, reported
        once (on the first response after it)."""
        source = active.kv_source
        elapsed = int(getattr(source, "elapsed_ns", 0) or 0)
        if not elapsed:
            return 0, 0
        moved = int(getattr(source, "num_pulled_bytes", 0) or 0)
        _close_source(source)
        active.kv_source = None
        return moved, elapsed

    def _hand_off(self, out: RequestOutput) -> PublishedKV:
        """Publish a finished prefill's KV and free its blocks."""
        try:
            if self._kv is None:
                raise WorkerUnavailable("context_only needs a KV transport; none is configured")
            return self._kv.publish(self._engine.export_kv(out.request_id), self._active[out.request_id].job.prompt_ids)
        finally:
            self._release(out.request_id)

    def _release(self, request_id: str) -> None:
        with contextlib.suppress(ValueError):  # nothing held: the engine already freed it
            self._engine.release_kv(request_id)

    def _finish_error(self, rid: str, exc: BaseException) -> None:
        active = self._active.pop(rid, None)
        if active is not None:
            _close_source(active.kv_source)
            self._responder.fail(rid, active.sink, exc)

    def _read_stats(self) -> WorkerStats:
        bm = self._engine.block_manager
        waiting = len(getattr(getattr(self._engine, "scheduler", None), "waiting", ()))
        imports = tuple(sorted(getattr(self._kv, "import_counts", {}).items()))
        return WorkerStats(bm.num_free_blocks, bm.num_total_blocks, len(self._active), waiting, imports)


def _close_source(source: Any) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            LOG.exception("closing a KV source failed")
