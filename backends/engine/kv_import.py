"""Asynchronous KV import: a request's `KVSource` is read into its reserved cache blocks on
import worker threads, off the engine's step thread (vLLM's WAITING_FOR_REMOTE_KVS).

Threads and ownership:
- The engine thread (the scheduler) submits, cancels and polls jobs; it never waits on a source
  (except `wait`, which the engine calls only when it has nothing else to step).
- Up to `num_workers` daemon threads, started by `submit` as needed, run one job at a time
  each; a worker idle for `idle_exit_s` exits (so an engine nobody closed is not kept alive by
  its workers), and `close()` stops and joins them. Per job: per layer, `source.read_layer` into a staging buffer of the job's own, then
  a copy into the rows of the job's `block_ids` in that layer's cache. A worker writes nothing
  else. The scheduler keeps those blocks reserved until `poll` has reported the job, even after
  `cancel`, so a block is never handed to another sequence while a worker may still write it.
- A job's outcome (`num_loaded`, `error`) is written by its worker before the job is published
  under the lock; `poll` reports each job exactly once, after which it is read-only.
Deadlines: every `read_layer` gets the job's `time.monotonic()` deadline (submit time +
`timeout_s`); a job still queued at its deadline fails without reading. A cancelled job stops at
the next layer boundary. On CUDA a worker writes on its own stream, after the work the engine had
queued when the job was submitted, and synchronizes before reporting the job.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import torch

from backends.engine.hooks import KVImportError, KVSource

LOG = logging.getLogger(__name__)
NUM_IMPORT_WORKERS = 4  # a stalled pull holds one worker until its deadline, not every import
IDLE_EXIT_S = 2.0


class ImportJob:
    """One import: `source`'s KV for its blocks into `block_ids` of every layer.

    `num_tokens` are the tokens the caller counts as loaded on success. After `poll` reported the
    job, `num_loaded` is `num_tokens` on success, else 0 with `error` saying why.
    """

    __slots__ = (
        "request_id", "source", "block_ids", "num_tokens", "deadline", "ready", "num_loaded",
        "error", "_cancelled",
    )  # fmt: skip

    def __init__(
        self,
        request_id: str,
        source: KVSource,
        block_ids: Sequence[int],
        num_tokens: int,
        deadline: float,
        ready: torch.cuda.Event | None,
    ) -> None:
        self.request_id = request_id
        self.source = source
        self.block_ids = tuple(int(b) for b in block_ids)
        self.num_tokens = num_tokens
        self.deadline = deadline
        self.ready = ready  # CUDA: marks the engine's work queued before the blocks were ours
        self.num_loaded = 0
        self.error: str | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the worker to stop at the next layer boundary (the job is still reported)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class KVImporter:
    """Runs `ImportJob`s on up to `num_workers` threads into `kv_caches` (`[num_blocks,
    block_size, kv_width]` per layer). `close()` cancels what is in flight and joins the
    workers."""

    def __init__(
        self,
        kv_caches: list[torch.Tensor],
        timeout_s: float,
        *,
        num_workers: int = NUM_IMPORT_WORKERS,
        idle_exit_s: float = IDLE_EXIT_S,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if num_workers <= 0:
            raise ValueError(f"num_workers must be > 0, got {num_workers}")
        self.kv_caches = kv_caches
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self.idle_exit_s = idle_exit_s
        self._queue: queue.SimpleQueue[ImportJob | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._finished: list[ImportJob] = []  # guarded by _cond
        self._in_flight: set[ImportJob] = set()  # engine thread only: submitted, not yet polled
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []  # guarded by _lock: the live workers
        self._num_started = 0
        self._closed = False

    @property
    def num_in_flight(self) -> int:
        """Jobs submitted and not yet reported by `poll`."""
        return len(self._in_flight)

    @property
    def num_workers_alive(self) -> int:
        with self._lock:
            return len(self._threads)

    def submit(
        self, request_id: str, source: KVSource, block_ids: Sequence[int], num_tokens: int
    ) -> ImportJob:
        """Queue an import into `block_ids` (held by the caller until `poll` reports the job)."""
        if self._closed:
            raise RuntimeError("submit on a closed KVImporter")
        device = self.kv_caches[0].device
        ready = None
        if device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        job = ImportJob(
            request_id, source, block_ids, num_tokens, time.monotonic() + self.timeout_s, ready
        )
        self._in_flight.add(job)
        self._queue.put(job)  # before _add_worker takes the lock: see _work's exit
        self._add_worker()
        return job

    def poll(self) -> list[ImportJob]:
        """Jobs that ended since the last call, in the order they ended; never blocks."""
        with self._cond:
            done, self._finished = self._finished, []
        self._in_flight.difference_update(done)
        return done

    def wait(self, timeout_s: float) -> bool:
        """Block until a job is ready for `poll` or `timeout_s` passed; True if one is."""
        if not self._in_flight:
            return False
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._finished), timeout_s)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel jobs in flight, stop the workers and join them within `timeout_s` in all (a
        worker inside a `read_layer` that ignores its deadline is left behind, a daemon)."""
        if self._closed:
            return
        self._closed = True
        for job in self._in_flight:
            job.cancel()
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        end = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))

    def _add_worker(self) -> None:
        """One more worker, up to `num_workers` (idle ones exit by themselves)."""
        with self._lock:
            if len(self._threads) >= self.num_workers:
                return
            thread = threading.Thread(
                target=self._work, name=f"kv-import-{self._num_started}", daemon=True
            )
            self._num_started += 1
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=self.idle_exit_s)
            except queue.Empty:
                with self._lock:
                    # A job queued before this check is still taken: `submit` queues before it
                    # asks for a worker, and a worker that left the list is replaced.
                    if self._queue.empty():
                        self._threads.remove(threading.current_thread())
                        return
                continue
            if job is None:
                with self._lock:
                    self._threads.remove(threading.current_thread())
                return
            self._execute(job)

    def _execute(self, job: ImportJob) -> None:
        try:
            self._run(job)
            job.num_loaded = job.num_tokens
        except _Stopped as exc:
            job.error = str(exc)
        except Exception as exc:  # a broken source must not take the worker down
            job.error = f"{type(exc).__name__}: {exc}"
            if job.cancelled:  # e.g. its owner closed the source after an abort
                job.error = f"cancelled ({job.error})"
            elif isinstance(exc, KVImportError):
                LOG.warning("KV import of %s failed: %s", job.request_id, exc)
            else:
                LOG.exception("KV import of %s failed", job.request_id)
        with self._cond:
            self._finished.append(job)
            self._cond.notify_all()

    def _run(self, job: ImportJob) -> None:
        cache0 = self.kv_caches[0]
        with torch.inference_mode(), _side_stream(cache0.device, job.ready):
            index = torch.tensor(job.block_ids, dtype=torch.int64, device=cache0.device)
            staging = torch.empty(
                (len(job.block_ids), *cache0.shape[1:]), dtype=cache0.dtype, device=cache0.device
            )
            for layer, cache in enumerate(self.kv_caches):
                _check_live(job)
                job.source.read_layer(layer, staging, job.deadline)
                if job.cancelled:
                    raise _Stopped("cancelled")
                cache.index_copy_(0, index, staging)


class _Stopped(Exception):
    """The job was cancelled or passed its deadline between layers."""


def _check_live(job: ImportJob) -> None:
    """Before reading a layer: stop if cancelled or late (a queued job may start late)."""
    if job.cancelled:
        raise _Stopped("cancelled")
    if time.monotonic() >= job.deadline:
        raise _Stopped(f"deadline passed ({job.request_id})")


@contextlib.contextmanager
def _side_stream(device: torch.device, ready: torch.cuda.Event | None) -> Iterator[None]:
    """CUDA: run the body on a stream of the worker's own that first waits for `ready`, and
    synchronize it on the way out, also after a failure (the blocks may be freed right after
    the job is reported, so no copy into them may still be queued). Elsewhere nothing."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    if ready is not None:
        stream.wait_event(ready)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        stream.synchronize()
