"""The worker's response thread: the only thread that calls its requests' sinks once submitted.

It delivers each request's updates and errors in the order the engine thread queued them, and
watches every request it has not finished yet for a client cancel: every ``POLL_S`` it asks the
sink's ``is_cancelled`` (TritonSink asks python_backend at most every 0.5 s, see
pb_lifetimes.py) and reports each cancel once through ``on_cancel`` (the engine thread aborts).
Sends and cancellation checks of one request therefore never run on two threads, and no check
follows the request's final response.

Tokens leave in as few responses as keep the client current: updates queued together go as one
response (``_coalesced``), and with a stream interval N > 1 (vLLM's ``stream_interval``, the
deployment's ``serving.stream_interval``) a request's first update goes at once and later tokens
wait until N are held or its final update or an error comes. Nothing is dropped or reordered.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from backends.serving.worker_io import WorkerUpdate, merge_updates

LOG = logging.getLogger(__name__)
POLL_S = 0.1


class ResponseSink(Protocol):
    """Where one request's responses go. Called from the response thread only."""

    def send(self, update: WorkerUpdate) -> None: ...
    def fail(self, exc: BaseException) -> None: ...
    def is_cancelled(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class _Item:
    """Watch ``sink`` (neither update nor error), send ``update``, or fail with ``error``."""

    request_id: str
    sink: ResponseSink
    update: WorkerUpdate | None = None
    error: BaseException | None = None


class Responder:
    """Owns the response thread. ``watch``/``send``/``fail`` queue work from any thread;
    ``close()`` delivers what is queued, then joins the thread (bounded by ``timeout_s``)."""

    def __init__(self, on_cancel: Callable[[str], None], stream_interval: int = 1) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self._on_cancel = on_cancel
        self._interval = stream_interval
        # response thread only, per sink (a cancel job shares its target's request id, not its sink):
        self._held: dict[ResponseSink, list[WorkerUpdate]] = {}  # updates not yet sent
        self._started: set[ResponseSink] = set()  # sinks whose first update went
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._watched: dict[str, ResponseSink] = {}  # response thread only
        self._next_poll_s = 0.0
        self._thread = threading.Thread(target=self._run, name="pd-respond", daemon=True)
        self._thread.start()

    def watch(self, request_id: str, sink: ResponseSink) -> None:
        """Polls ``sink`` for a cancel until its final response (queue it before any update)."""
        self._queue.put(_Item(request_id, sink))

    def send(self, request_id: str, sink: ResponseSink, update: WorkerUpdate) -> None:
        self._queue.put(_Item(request_id, sink, update=update))

    def fail(self, request_id: str, sink: ResponseSink, exc: BaseException) -> None:
        self._queue.put(_Item(request_id, sink, error=exc))

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            try:
                items = [self._queue.get(timeout=POLL_S)]
            except queue.Empty:
                items = []
            while items and items[-1] is not None:  # everything queued meanwhile, in one pass
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = bool(items) and items[-1] is None
            for item in _coalesced([i for i in items if i is not None]):
                self._deliver(item)
            if closing:
                return
            if time.monotonic() >= self._next_poll_s:
                self._poll()
                self._next_poll_s = time.monotonic() + POLL_S

    def _deliver(self, item: _Item) -> None:
        if item.update is None and item.error is None:
            self._watched[item.request_id] = item.sink
            return
        final = item.error is not None or (item.update is not None and item.update.final)
        if final and self._watched.get(item.request_id) is item.sink:
            del self._watched[item.request_id]
        update = self._due(item.sink, item.update, final)
        try:
            if update is not None:
                item.sink.send(update)
            if item.error is not None:
                item.sink.fail(item.error)
        except Exception:  # a broken client connection must not stop the others
            LOG.exception("sending a response failed")

    def _due(self, sink: ResponseSink, update: WorkerUpdate | None, final: bool) -> WorkerUpdate | None:
        """What to send now to ``sink`` under the stream interval: ``update`` with every
        held update merged in front of it, or None while fewer than N tokens are held. A final
        update or an error releases everything held (an error after held tokens: they go first)."""
        if self._interval == 1:
            return update
        held = self._held.pop(sink, [])
        if update is not None:
            held.append(update)
        if final:
            self._started.discard(sink)
        elif sink not in self._started:
            self._started.add(sink)  # the first update goes at once (time to first token)
        elif sum(len(u.new_token_ids) for u in held) < self._interval:
            self._held[sink] = held
            return None
        return merge_updates(held) if len(held) > 1 else (held[0] if held else None)

    def _poll(self) -> None:
        for request_id, sink in list(self._watched.items()):
            try:
                cancelled = sink.is_cancelled()
            except Exception:
                LOG.exception("checking request %s for a cancel failed", request_id)
                cancelled = True
            if cancelled:
                del self._watched[request_id]  # reported once; its final response still goes out
                self._on_cancel(request_id)


def _coalesced(items: list[_Item]) -> list[_Item]:
    """``items`` in order, each sink's consecutive updates merged into one response
    (worker_io.merge_updates): when the engine outruns this thread, a request gets one response
    with several tokens instead of falling further behind. An error ends its sink's run."""
    runs: list[tuple[_Item, list[WorkerUpdate]]] = []  # each item, with the updates merged into it
    open_runs: dict[int, list[WorkerUpdate]] = {}  # id(sink) -> the updates of its open run
    for item in items:
        key = id(item.sink)
        run = open_runs.get(key)
        if item.update is not None and run is not None:
            run.append(item.update)
            if item.update.final:
                del open_runs[key]
            continue
        open_runs.pop(key, None)
        updates = [] if item.update is None else [item.update]
        runs.append((item, updates))
        if item.update is not None and not item.update.final:
            open_runs[key] = updates
    return [replace(item, update=merge_updates(updates)) if len(updates) > 1 else item for item, updates in runs]
