"""When python_backend's own threads are done with an object, and a cheap cancellation check.

python_backend (Triton 2.51, r24.10: src/pb_stub.cc, pb_response_iterator.cc, pb_cancel.cc,
response_sender.cc) has three hazards that crashed the ``llm`` stub and tritonserver under
client cancels at load (issue 8). Each frees memory that another thread still uses:

1. A decoupled BLS ``ResponseIterator`` is also held by the stub's iterator map. Reading its
   final response queues a cleanup that the stub's stub-to-parent thread serves later: it
   erases the map entry *without the GIL*. If Python has dropped the iterator by then, the map
   held the last reference and ``~ResponseIterator`` frees every response's numpy arrays on
   that thread without the GIL; numpy's small-buffer cache and pymalloc are only safe under
   the GIL, so the heap is corrupted ("double free or corruption (fasttop)" in ``array_dealloc``
   later, a SIGSEGV in pymalloc).
2. Every uncached ``is_cancelled()`` writes a new IsCancelledMessage (a mutex and a condition in
   shared memory) and frees the request's previous one; the request's last one is freed with
   the request. The parent still unlocks that mutex after the stub has read its answer. Asked
   often (the orchestrator asked every 0.1 s and on every update, workers every 20 ms for every
   request), a freed message is reused while the parent holds its mutex: tritonserver aborts
   with ``boost::interprocess::lock_exception`` in ``ProcessIsRequestCancelled``.
3. ``ResponseSender.send`` drops the outputs the client did not request without the GIL
   (``PruneOutputTensors`` under ``gil_scoped_release``): their arrays are freed as in 1.

What we rely on: the stub-to-parent thread serves its queue (iterator cleanups, is_cancelled
messages, ...) one message at a time, in order, and the parent's thread answers them in that
order; ``is_cancelled()`` blocks until its own answer. So when an ``is_cancelled()`` exchange
that started after X returns, the stub has erased every iterator finished before X, and the
parent is done with every is_cancelled message sent before X. ``Keeper`` holds finished
iterators and finished requests until such an exchange; ``CancelCheck`` asks at most once per
interval per request (so a request's previous message is never freed while the parent may
still hold it) and is where those exchanges happen. Hazard 3 is avoided by sending only the
requested outputs (``requested_outputs``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")
CHECK_INTERVAL_S = 0.5
MAX_AGE_S = 5.0


class Keeper:
    """Holds python_backend objects until python_backend's threads are done with them.

    ``hold(obj)`` keeps a reference until an ``exchange`` that started after the hold has
    returned, or, when no exchange happens (an idle server), until it is ``max_age_s`` old;
    the reference is then dropped on whichever Python thread calls ``hold`` or ``exchange``
    (with the GIL). Thread-safe. ``close()`` drops everything (the stub is finalizing).
    """

    def __init__(self, max_age_s: float = MAX_AGE_S, clock: Callable[[], float] = time.monotonic) -> None:
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s}")
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._held: deque[tuple[int, float, object]] = deque()  # (exchanges started at hold, time, obj)
        self._started = 0
        self._proven = 0  # every object held while fewer than this many exchanges had started is safe

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def hold(self, *objects: object) -> None:
        with self._lock:
            now = self._clock()
            self._held.extend((self._started, now, obj) for obj in objects)
        self._release()

    def exchange(self, call: Callable[[], T]) -> T:
        """Runs ``call``, an uncached python_backend ``is_cancelled()`` (a blocking round trip
        through the stub's ordered queue to the parent), as the proof that frees held objects.
        When ``call`` raises, nothing is proven."""
        with self._lock:
            self._started += 1
            number = self._started
        result = call()
        with self._lock:
            self._proven = max(self._proven, number)
        self._release()
        return result

    def _release(self) -> None:
        dropped = []
        with self._lock:
            now = self._clock()
            while self._held:
                started, since, _ = self._held[0]
                if started >= self._proven and now - since < self._max_age_s:
                    break
                dropped.append(self._held.popleft())
        del dropped  # outside the lock: destructors may queue stub messages

    def close(self) -> None:
        with self._lock:
            dropped = list(self._held)
            self._held.clear()
        del dropped


class CancelCheck:
    """One request's cancellation through python_backend's ``is_cancelled``, cheaply.

    Asks over IPC (through ``keeper.exchange``) at most once per ``interval_s``, the first time
    ``interval_s`` after construction, and remembers a True for good; in between it answers
    from memory. Call it from one thread only: the thread that sends the request's responses
    (python_backend must not see is_cancelled after, or concurrent with, the final response).
    """

    def __init__(self, probe: Callable[[], Any], keeper: Keeper, interval_s: float = CHECK_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._probe = probe
        self._keeper = keeper
        self._interval_s = interval_s
        self._clock = clock
        self._next_s = clock() + interval_s
        self._cancelled = False
        self.num_probes = 0

    def __call__(self) -> bool:
        if self._cancelled or self._clock() < self._next_s:
            return self._cancelled
        self.num_probes += 1
        self._cancelled = bool(self._keeper.exchange(self._probe))
        self._next_s = self._clock() + self._interval_s
        return self._cancelled


def requested_outputs(tensors: Mapping[str, T], requested: Iterable[str]) -> dict[str, T]:
    """The tensors the client asked for (python_backend would drop the others without the GIL)."""
    wanted = set(requested)
    return {name: value for name, value in tensors.items() if name in wanted}
