"""An Executor on daemon threads, for blocking calls that may never return.

``concurrent.futures.ThreadPoolExecutor`` joins its (non-daemon) threads at interpreter exit,
so one thread stuck in a call that never returns (a BLS response iterator's ``next`` whose
final response never comes) keeps the Triton stub from exiting. DaemonExecutor's threads are
daemons: nothing waits for them at exit, and ``shutdown`` never joins them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonExecutor(Executor):
    """Runs submitted calls on up to ``max_threads`` daemon threads, started as needed.

    A thread is started when the calls waiting for a thread outnumber the threads waiting for
    a call (counted under one lock: a thread that just finished a call but has not yet come
    back for the next is not counted idle, so a call never queues behind a busy thread while
    there is room for another). ``shutdown`` stops idle threads, cancels queued calls with
    ``cancel_futures`` and never waits; ``submit`` after it is a RuntimeError.
    """

    def __init__(self, max_threads: int, name: str) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self._max_threads = max_threads
        self._name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._pending = 0  # calls queued and not yet taken by a thread
        self._waiting = 0  # threads waiting for a call
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._written_off = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: submit after shutdown")
            future: Future[Any] = Future()
            self._work.put((future, fn, args, kwargs))
            self._pending += 1
            counted = len(self._threads) - self._written_off
            if self._pending > self._waiting and counted < self._max_threads:
                thread = threading.Thread(target=self._run, name=f"{self._name}_{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                self._waiting += 1
                thread.start()
            return future

    def write_off(self) -> None:
        """The caller knows that one running call will never return (a BLS ``next`` on a dead
        worker): its thread stops counting toward ``max_threads``, so a new one may start."""
        with self._lock:
            self._written_off += 1

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = False) -> None:
        """Stops the threads once they are idle; ``wait`` is ignored (daemons are never joined)."""
        with self._lock:
            self._closed = True
            while cancel_futures:
                try:
                    work = self._work.get_nowait()
                except queue.Empty:
                    break
                if work is not None:
                    work[0].cancel()
            self._work.put(None)

    def _run(self) -> None:
        while True:
            work = self._work.get()
            if work is None:
                self._work.put(None)  # wakes the next thread to stop too
                return
            with self._lock:
                self._pending -= 1
                self._waiting -= 1
            future, fn, args, kwargs = work
            del work
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs
            with self._lock:
                self._waiting += 1
