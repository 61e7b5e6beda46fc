"""The transport interface: move a multi-layer KV payload layer by layer.

A payload is ``num_layers`` layers of ``layer_nbytes`` bytes each. On either side a layer is
a list of contiguous byte *runs* (e.g. the blocks of one layer at some pool slots, adjacent
slots merged), described by :class:`LayerBuffers`; the two sides may split a layer
differently. The producer calls ``start_send`` and then ``publish_layer(i)`` as soon as layer
i's KV is written (layers in order), so layer i travels while layer i+1 is computed; the
consumer's ``start_recv`` handle lets it wait for layer i alone (``wait_layer``) or all.

Ownership: the transport reads the source runs from ``publish_layer(i)`` until the send
handle is closed, and writes the destination runs until the receive handle is closed; when
``pins`` is given, the source slots are pinned from ``start_send`` to ``close()``. Deadlines
are absolute ``time.monotonic()`` values; a wait past its deadline raises TransferTimeout and
every handle's ``close()`` releases what it holds (idempotent). The LayerBuffers over
memory (pool regions, per-layer arrays) and the copies between them are in regions.py.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from kvbridge.pool import PoolHandle
from kvbridge.slots import SlotAllocator


class LayerBuffers(Protocol):
    num_layers: int
    layer_nbytes: int

    def layer_runs(self, layer: int) -> list[np.ndarray]:
        """Contiguous 1-D uint8 views (no copies) covering the layer in order."""
        ...


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """What the consumer needs to receive one transfer (the producer fills it in).

    ``endpoint`` ("host:port") is the producer's block server (tcp); ``pool`` the producer's
    shared-memory pool (shm). ``source_slots`` are the producer's slots; with an empty
    ``transfer_id`` a tcp receiver pulls those (already written) slots from the pool the
    block server serves, instead of a published transfer; ``pool_name`` then names the
    pool those slots belong to (the server refuses a pull or pin of another pool), and
    ``source_gens`` (from a KV handle's ``block_gens``, one per source slot) their generations:
    the server then pins only slots that still have them and answers a stale pull with
    ErrorReply("stale"). A pull by slots must carry them; a published transfer has none.
    ``num_held`` (a pull by slots only): the first ``num_held`` source slots are blocks the
    consumer already holds. They are pinned with the rest for the pull, so the producer sees
    the same slots pinned and unpinned as for a whole pull (its lease on a handle ends exactly
    as then), but only ``source_slots[num_held:]`` move: ``layer_nbytes`` counts those, and at
    least one must remain (nothing to move: ``TcpTransport.release``).
    """

    transfer_id: str
    num_layers: int
    layer_nbytes: int
    endpoint: str = ""
    pool: PoolHandle | None = None
    source_slots: tuple[int, ...] = ()
    pool_name: str = ""
    source_gens: tuple[int, ...] = ()
    num_held: int = 0

    def __post_init__(self) -> None:
        if len(self.transfer_id) > 200 or not all(c.isalnum() or c in "._-" for c in self.transfer_id):
            raise ValueError(f"transfer_id: expected [A-Za-z0-9._-]{{0,200}}, got {self.transfer_id!r}")
        if self.num_layers < 1 or self.layer_nbytes < 1:
            raise ValueError(f"num_layers/layer_nbytes: expected >= 1, got {self.num_layers}/{self.layer_nbytes}")
        pull_by_slots = not self.transfer_id and bool(self.source_slots)
        if (pull_by_slots or self.source_gens) and len(self.source_gens) != len(self.source_slots):
            raise ValueError(f"source_gens: expected {len(self.source_slots)} generations (one per source slot), "
                             f"got {len(self.source_gens)}")
        if self.num_held and not (pull_by_slots and 0 < self.num_held < len(self.source_slots)):
            raise ValueError(f"num_held: expected 0, or 1..{len(self.source_slots) - 1} for a pull by slots "
                             f"(transfer_id {self.transfer_id!r}, {len(self.source_slots)} slots), got {self.num_held}")

    @property
    def moved_slots(self) -> tuple[int, ...]:
        """The source slots whose bytes move (all but the ``num_held`` the consumer holds)."""
        return self.source_slots[self.num_held:]

    def check_buffers(self, buffers: LayerBuffers, side: str) -> None:
        if (buffers.num_layers, buffers.layer_nbytes) != (self.num_layers, self.layer_nbytes):
            raise ValueError(
                f"{side}: buffers hold {buffers.num_layers} layers x {buffers.layer_nbytes} bytes, "
                f"spec says {self.num_layers} x {self.layer_nbytes}"
            )


def check_next_layer(layer: int, published: int, num_layers: int) -> None:
    """ValueError unless ``layer`` is the next to publish after ``published`` of ``num_layers``."""
    if layer != published or layer >= num_layers:
        raise ValueError(f"layer: expected to publish layer {published} next, got {layer}")


class SlotPins:
    """Keeps ``slots`` pinned in ``pins`` (when given) from construction to ``release()`` (idempotent)."""

    __slots__ = ("_pins", "_slots")

    def __init__(self, pins: SlotAllocator | None, slots: tuple[int, ...]) -> None:
        self._slots = slots
        self._pins = pins
        if pins is not None:
            pins.pin(slots)

    def release(self) -> None:
        pins, self._pins = self._pins, None
        if pins is not None:
            pins.unpin(self._slots)


class SendHandle(ABC):
    @abstractmethod
    def publish_layer(self, layer: int) -> None:
        """Layer ``layer`` (the next in order) is written and may be sent."""

    @abstractmethod
    def poll(self) -> int:
        """Layers the consumer has received so far (non-blocking)."""

    @abstractmethod
    def wait(self, deadline: float) -> None:
        """Blocks until the consumer has every layer; TransferTimeout past ``deadline``."""

    @abstractmethod
    def close(self) -> None:
        """Ends the transfer (aborting it if unfinished) and releases pins. Idempotent."""


class RecvHandle(ABC):
    @abstractmethod
    def poll(self) -> int:
        """Layers complete in the destination so far (non-blocking)."""

    @abstractmethod
    def wait_layer(self, layer: int, deadline: float) -> None:
        """Blocks until layers 0..``layer`` are in the destination."""

    def wait(self, deadline: float) -> None:
        self.wait_layer(self.num_layers - 1, deadline)

    num_layers: int

    @abstractmethod
    def close(self) -> None:
        """Stops writing into the destination and releases the connection. Idempotent."""


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """What a node gives every transport it opens by name (registry.open_transport): the host
    its block server binds, the peers' token, the deadline of one transfer and of a connect."""

    host: str = "127.0.0.1"
    token: str | None = None
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0


class Transport(ABC):
    name: ClassVar[str]
    # the optional package it needs ("": none); registry.choose_pull_transport names it
    package: ClassVar[str] = ""
    # whether it moves a finished prefill's blocks by KV handle (TransferSpec with an empty
    # transfer_id: what KVNode's pull side needs), not only published transfers
    pulls_by_handle: ClassVar[bool] = False

    @classmethod
    def available(cls) -> bool:
        """Whether this transport's optional package (if any) is installed here."""
        return True

    @classmethod
    def from_options(cls, options: TransportOptions) -> Transport:
        """A new transport from ``options`` alone; ValueError for one that needs more (e.g.
        deepep's process group: build that one directly)."""
        raise ValueError(f"name: transport {cls.name!r} cannot be opened from TransportOptions alone")

    @abstractmethod
    def start_send(self, spec: TransferSpec, source: LayerBuffers, pins: SlotAllocator | None = None) -> SendHandle:
        ...

    @abstractmethod
    def start_recv(self, spec: TransferSpec, dest: LayerBuffers) -> RecvHandle:
        ...

    @abstractmethod
    def close(self) -> None:
        ...


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (monotonic), never negative."""
    return max(0.0, deadline - time.monotonic())


def wait_until(ready: Callable[[], bool], deadline: float) -> bool:
    """Polls ``ready`` with a short exponential backoff (20 us .. 1 ms) until the deadline."""
    pause = 2e-5
    while not ready():
        if time.monotonic() >= deadline:
            return ready()
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
    return True
