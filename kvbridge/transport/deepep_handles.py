"""Send and receive handles of the deepep transport (see deepep.py for the protocol).

A handle's ``run`` is executed by the transport's one worker thread, transfers in start order;
the caller's thread only publishes, polls, waits (with deadlines) and closes. Per layer the
worker agrees with the peer through a :class:`LayerGate` and then runs one collective through
an :class:`Exchange` (deepep_exchange.py: a DeepEP dispatch, or gloo on CPU in tests).
Ownership: the source is read (packed into private rows) only between ``publish_layer(i)`` and
``close()``, the destination written only before ``close()`` returns; a layer already agreed on
still goes through the collective after ``close()`` (from the private rows, into a discarded
result), so the group's collectives stay matched.

Giving up reaches the peer at once: a closed handle withdraws (producer) or refuses (consumer)
the next layer; a producer still waiting for a layer to be published checks every
REFUSAL_POLL_S whether the consumer refused it; a side whose layer fails after a matched
exchange (ProtocolError) gives up on the next layer before raising. So neither side's worker
waits on a transfer its peer ended (it would hold up every later transfer of the transport).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial

import torch

from kvbridge.errors import (
    KVBridgeError,
    ProtocolError,
    RemoteError,
    TransferTimeout,
    describe_pending,
)
from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import (
    LayerBuffers,
    RecvHandle,
    SendHandle,
    SlotPins,
    TransferSpec,
    check_next_layer,
)
from kvbridge.transport.deepep_exchange import Exchange
from kvbridge.transport.deepep_gate import ACCEPT, OFFER, REFUSED, WITHDRAWN, LayerGate
from kvbridge.transport.deepep_rows import (
    RowLayout,
    pack_layer,
    read_tags,
    transfer_key,
    unpack_rows,
)

POLL_MIN_S, POLL_MAX_S = 2e-5, 1e-3
REFUSAL_POLL_S = 0.01  # how often a producer waiting for a layer to be published checks for a refusal


class _Transfer:
    """State shared by both handles: progress, the first error, closing, and deadline waits."""

    def __init__(self, spec: TransferSpec, buffers: LayerBuffers, store: object, max_row_bytes: int) -> None:
        self.spec = spec
        self.num_layers = spec.num_layers
        self._buffers = buffers
        self._gate = LayerGate(store, spec.transfer_id)
        self._layout = RowLayout.for_layer(spec.layer_nbytes, max_row_bytes)
        self._key = transfer_key(spec.transfer_id)
        self._cond = threading.Condition()
        self._data_lock = threading.Lock()  # held while reading the source / writing the dest
        self._done = 0
        self._error: KVBridgeError | None = None
        self._closed = False

    def fail(self, error: KVBridgeError) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    def _advance(self) -> None:
        with self._cond:
            self._done += 1
            self._cond.notify_all()

    def _is_closed(self) -> bool:
        with self._cond:
            return self._closed

    def _poll_gate(self, step: Callable[[], bytes | None]) -> bytes | None:
        """Calls ``step`` with a short backoff until it answers; None once the handle is closed."""
        pause = POLL_MIN_S
        while not self._is_closed():
            got = step()
            if got is not None:
                return got
            time.sleep(pause)
            pause = min(2 * pause, POLL_MAX_S)
        return None

    def _wait_count(self, count: int, deadline: float, what: str, pending: str) -> None:
        start = time.monotonic()
        with self._cond:
            self._cond.wait_for(lambda: self._done >= count or self._error is not None,
                                timeout=max(0.0, deadline - start))
            if self._done >= count:
                return
            if self._error is not None:
                raise self._error
        raise TransferTimeout(what, deadline - start, f"{pending}{describe_pending(list(range(self._done, count)))}")

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        with self._data_lock:
            pass  # a pack or unpack in progress has finished; none starts after this


class DeepEPSendHandle(_Transfer, SendHandle):
    """Producer side: ``poll`` counts layers whose dispatch has completed on this rank."""

    def __init__(self, spec: TransferSpec, source: LayerBuffers, store: object, max_row_bytes: int,
                 dest_rank: int, pins: SlotAllocator | None) -> None:
        _Transfer.__init__(self, spec, source, store, max_row_bytes)
        self._dest_rank = dest_rank
        self._published = 0
        self._pins = SlotPins(pins, spec.source_slots)

    def publish_layer(self, layer: int) -> None:
        with self._cond:
            check_next_layer(layer, self._published, self.num_layers)
            if self._closed:
                raise RuntimeError(f"deepep transfer {self.spec.transfer_id} is closed")
            self._published += 1
            self._cond.notify_all()

    def poll(self) -> int:
        return self._done

    def wait(self, deadline: float) -> None:
        self._wait_count(self.num_layers, deadline, f"deepep send {self.spec.transfer_id}", "consumer acks for ")

    def close(self) -> None:
        self._close()
        self._pins.release()

    def _ready(self, layer: int) -> bool:
        """Blocks until ``layer`` is published (True), or the handle closes or the consumer refuses
        the layer first (False): a producer whose consumer gave up fails without waiting for data."""
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._published > layer or self._closed, timeout=REFUSAL_POLL_S):
                    return not self._closed
            if self._gate.refused_early(layer):
                return False

    def _pack(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s rows once it is published; None when the handle closes or the consumer
        refuses first."""
        if not self._ready(layer):
            return None
        with self._data_lock:
            if self._is_closed():
                return None
            return pack_layer(self._buffers.layer_runs(layer), self._layout, layer=layer, key=self._key)

    def _answer(self, layer: int) -> bytes | None:
        answer = self._gate.answer(layer)
        return None if answer == OFFER else answer

    def run(self, exchange: Exchange) -> None:
        layer = 0
        while layer < self.num_layers and self._step(exchange, layer):
            layer += 1

    def _step(self, exchange: Exchange, layer: int) -> bool:
        """Moves ``layer``: True once dispatched, False once we withdrew (the consumer stops there)."""
        tid = self.spec.transfer_id
        rows = self._pack(layer)
        answer = self._gate.withdraw(layer) if rows is None else self._gate.offer(layer)
        if answer == OFFER:
            answer = self._poll_gate(partial(self._answer, layer)) or self._gate.withdraw(layer)
        if answer == REFUSED:
            raise RemoteError("aborted", f"deepep transfer {tid}: the consumer gave up at layer {layer}")
        if answer != ACCEPT or rows is None:
            return False
        try:
            received = exchange.exchange(rows, self._dest_rank)
            if received.shape[0]:
                raise ProtocolError(f"deepep transfer {tid}: the producer received {received.shape[0]} rows")
        except KVBridgeError:
            if layer + 1 < self.num_layers:
                self._gate.withdraw(layer + 1)  # else the consumer waits for an offer that never comes
            raise
        self._advance()
        return True


class DeepEPRecvHandle(_Transfer, RecvHandle):
    """Consumer side: ``poll`` counts layers written into the destination."""

    def poll(self) -> int:
        return self._done

    def wait_layer(self, layer: int, deadline: float) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: {layer} out of range [0, {self.num_layers})")
        if self._is_closed():
            raise RuntimeError(f"deepep transfer {self.spec.transfer_id} is closed")
        self._wait_count(layer + 1, deadline, f"deepep recv {self.spec.transfer_id}", "")

    def close(self) -> None:
        self._close()

    def run(self, exchange: Exchange) -> None:
        idle = torch.zeros((1, self._layout.hidden), dtype=torch.bfloat16)
        layer = 0
        while layer < self.num_layers and self._step(exchange, layer, idle):
            layer += 1

    def _step(self, exchange: Exchange, layer: int, idle: torch.Tensor) -> bool:
        """Moves ``layer``: True once dispatched (written unless closed meanwhile), False once we
        refused (the producer stops there)."""
        tid = self.spec.transfer_id
        answer = self._poll_gate(partial(self._gate.accept, layer))
        if answer is None:
            answer = self._gate.refuse(layer)
        if answer == WITHDRAWN:
            raise RemoteError("aborted", f"deepep transfer {tid}: the producer gave up at layer {layer}")
        if answer != ACCEPT:
            return False
        try:
            rows = exchange.exchange(idle, None)
            index = read_tags(rows, self._layout, layer=layer, key=self._key)
        except KVBridgeError:
            if layer + 1 < self.num_layers:
                self._gate.refuse(layer + 1)  # else the producer waits for an answer that never comes
            raise
        with self._data_lock:
            if self._is_closed():
                return True  # the next layer is refused
            unpack_rows(rows, index, self._buffers.layer_runs(layer), self.spec.layer_nbytes)
        self._advance()
        return True
