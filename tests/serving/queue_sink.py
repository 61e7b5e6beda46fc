"""A worker ResponseSink that queues what the worker sends, for tests of WorkerService."""

from __future__ import annotations

import queue

from backends.serving.worker_io import WorkerUpdate


class QueueSink:
    def __init__(self) -> None:
        self.items: queue.Queue[WorkerUpdate | BaseException] = queue.Queue()

    def send(self, update: WorkerUpdate) -> None:
        self.items.put(update)

    def fail(self, exc: BaseException) -> None:
        self.items.put(exc)

    def is_cancelled(self) -> bool:
        return False

    def final(self, timeout_s: float) -> WorkerUpdate | BaseException:
        """The next final update or error (updates before it are dropped)."""
        while True:
            item = self.items.get(timeout=timeout_s)
            if isinstance(item, BaseException) or item.final:
                return item

    def collect(self, timeout_s: float = 30) -> list[WorkerUpdate]:
        """Every update up to and including the final one; an error is raised."""
        out: list[WorkerUpdate] = []
        while not out or not out[-1].final:
            item = self.items.get(timeout=timeout_s)
            if isinstance(item, BaseException):
                raise item
            out.append(item)
        return out
