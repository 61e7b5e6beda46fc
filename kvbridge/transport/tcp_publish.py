"""A published tcp transfer: the producer's send handle, served by its node's BlockServer.

``start_send`` registers one; layers wait here until a receiver pulls them. The source
slots (``pins``) stay pinned from construction to ``close()``. The server's connection
thread calls ``claim``/``wait_published``/``layers_sent``/``finish``.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from kvbridge.errors import KVBridgeError, RemoteError, TransferTimeout, describe_pending
from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import (
    LayerBuffers,
    SendHandle,
    SlotPins,
    TransferSpec,
    check_next_layer,
    remaining,
)


class Registry(Protocol):
    def unregister(self, transfer_id: str, transfer: PublishedTransfer) -> None:
        ...


class PublishedTransfer(SendHandle):
    """A send handle of the tcp transport: layers wait here until a receiver pulls them."""

    def __init__(self, server: Registry, spec: TransferSpec, source: LayerBuffers,
                 pins: SlotAllocator | None) -> None:
        self.spec = spec
        self._source: LayerBuffers | None = source
        self._server = server
        self._cond = threading.Condition()
        self._published = 0
        self._sent = 0
        self._done = False
        self._claimed = False
        self._closed = False
        self._error: KVBridgeError | None = None
        self._pins = SlotPins(pins, spec.source_slots)

    def publish_layer(self, layer: int) -> None:
        with self._cond:
            check_next_layer(layer, self._published, self.spec.num_layers)
            self._published += 1
            self._cond.notify_all()

    def poll(self) -> int:
        return self._sent

    def wait(self, deadline: float) -> None:
        start = time.monotonic()
        with self._cond:
            self._cond.wait_for(lambda: self._done or self._error is not None, remaining(deadline))
            if self._error is not None:
                raise self._error
            if not self._done:
                pending = describe_pending(list(range(self._sent, self.spec.num_layers)))
                raise TransferTimeout(f"tcp send {self.spec.transfer_id}", deadline - start, pending)

    @property
    def source(self) -> LayerBuffers:
        if self._source is None:
            raise RemoteError("aborted", f"transfer {self.spec.transfer_id} was closed by its producer")
        return self._source

    def close(self) -> None:
        self._server.unregister(self.spec.transfer_id, self)
        with self._cond:
            self._closed = True
            self._source = None  # the connection thread holds its own reference while streaming
            self._cond.notify_all()
        self._pins.release()

    # ----- called by the server's connection thread

    def claim(self) -> None:
        with self._cond:
            if self._claimed or self._closed:
                raise ValueError(f"transfer_id: {self.spec.transfer_id!r} is already being pulled or closed")
            self._claimed = True

    def wait_published(self, layer: int, deadline: float, start: float) -> int:
        """Blocks until layer ``layer`` is published; returns how many layers are published."""
        with self._cond:
            self._cond.wait_for(lambda: self._published > layer or self._closed, remaining(deadline))
            if self._closed:
                raise RemoteError("aborted", f"transfer {self.spec.transfer_id} was closed by its producer")
            if self._published <= layer:
                pending = describe_pending(list(range(self._published, self.spec.num_layers)))
                raise TransferTimeout(f"tcp serve {self.spec.transfer_id}", deadline - start, f"producer publishing {pending}")
            return self._published

    def layers_sent(self, num_layers: int) -> None:
        self._sent = num_layers

    def finish(self, error: KVBridgeError | None) -> None:
        with self._cond:
            self._done = error is None
            # no traceback: its frames would keep the connection's buffer views alive
            self._error = None if error is None else error.with_traceback(None)
            self._cond.notify_all()
