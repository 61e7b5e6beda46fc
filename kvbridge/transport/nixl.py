"""NIXL transport: the consumer READs each published layer straight out of the producer's memory.

Works on host memory (NIXL ``DRAM_SEG`` over its UCX backend: shm/cma on one host, tcp or RDMA
across hosts); tested here between two CPU-only processes with ``nixl-cu12``. Each transport owns
one NIXL agent (nixl_agent.py). Not covered: device (VRAM) pools and pulls by KV handle (an
empty transfer_id); those need a GPU and the block server respectively. Protocol, one-sided
from the consumer:

* ``start_send`` registers the source memory and a 64-byte control block (int64 words: magic,
  published, state) with the agent; the returned handle's ``spec`` is a :class:`NixlTransferSpec`
  (the caller's spec plus the agent's metadata and the remote addresses) — that is what the
  consumer needs. ``publish_layer`` bumps *published* after the layer's bytes are written.
* The consumer loads the producer's metadata, READs the control block, and READs layers
  [received, published) into its destination in one NIXL request whose completion notification
  (``"<transfer_id>:<layers>"``) acks them to the producer; ``close()`` before the end sends
  ``"<transfer_id>:abort"``. A producer that closes early sets *state* so the consumer fails fast
  (RemoteError: "the producer gave up", or a failed READ once the memory is deregistered).

Ownership: registrations are reference-counted per (address, size) and released by the handle's
``close()``; the transport's ``close()`` releases the agent. A transfer still in flight at close
is waited for (bounded) before its destination is deregistered, never abandoned mid-write.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbridge.errors import RemoteError, TransferTimeout, describe_pending
from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import (
    LayerBuffers,
    RecvHandle,
    SendHandle,
    SlotPins,
    TransferSpec,
    Transport,
    TransportOptions,
    check_next_layer,
    wait_until,
)
from kvbridge.transport.nixl_agent import NixlAgent, Region, nixl_available, pair_runs
from kvbridge.transport.regions import PoolRegion

__all__ = ["NixlRecvHandle", "NixlSendHandle", "NixlTransferSpec", "NixlTransport", "nixl_available"]

_CTL_MAGIC = 0x4B56424E49584C31  # "KVBNIXL1"
_MAGIC, _PUBLISHED, _STATE = range(3)
_RUNNING, _PRODUCER_ABORTED = 0, 1
_CTL_WORDS = 8


@dataclass(frozen=True, slots=True)
class NixlTransferSpec(TransferSpec):
    """A TransferSpec plus what a NIXL consumer needs: the producer agent's metadata (its UCX
    address and memory keys), the control block's address, and each layer's source runs."""

    agent_metadata: bytes = b""
    control_addr: int = 0
    layer_addrs: tuple[tuple[Region, ...], ...] = ()

    def __post_init__(self) -> None:
        TransferSpec.__post_init__(self)
        if not self.transfer_id or not self.agent_metadata or not self.control_addr:
            raise ValueError("spec: a nixl spec needs a transfer_id, agent metadata and a control address")
        if len(self.layer_addrs) != self.num_layers:
            raise ValueError(f"layer_addrs: {len(self.layer_addrs)} layers, spec says {self.num_layers}")
        for i, runs in enumerate(self.layer_addrs):
            if sum(n for _, n in runs) != self.layer_nbytes:
                raise ValueError(f"layer_addrs[{i}]: runs sum to {sum(n for _, n in runs)} bytes, "
                                 f"spec says {self.layer_nbytes}")


def _regions(buffers: LayerBuffers) -> list[Region]:
    """Memory to register for ``buffers``: a pool region's whole array, else every layer run."""
    if isinstance(buffers, PoolRegion):
        return [(buffers.array.ctypes.data, buffers.array.nbytes)]
    return [(run.ctypes.data, run.nbytes) for layer in range(buffers.num_layers) for run in buffers.layer_runs(layer)]


def _layer_addrs(buffers: LayerBuffers, layer: int) -> list[Region]:
    return [(run.ctypes.data, run.nbytes) for run in buffers.layer_runs(layer)]


class NixlSendHandle(SendHandle):
    """Producer side; ``spec`` (a NixlTransferSpec) is what the consumer's ``start_recv`` takes."""

    def __init__(self, agent: NixlAgent, spec: TransferSpec, source: LayerBuffers, pins: SlotAllocator | None) -> None:
        self._agent = agent
        self._ctl: np.ndarray | None = np.zeros(_CTL_WORDS, dtype=np.int64)
        agent.open_send(spec.transfer_id)
        try:
            self._regions = agent.register([*_regions(source), (self._ctl.ctypes.data, self._ctl.nbytes)])
        except BaseException:
            agent.close_send(spec.transfer_id)
            raise
        self._ctl[_MAGIC] = _CTL_MAGIC
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(TransferSpec)}
        self.spec = NixlTransferSpec(
            **fields, agent_metadata=agent.metadata(), control_addr=self._ctl.ctypes.data,
            layer_addrs=tuple(tuple(_layer_addrs(source, i)) for i in range(spec.num_layers)),
        )
        self._published = 0
        self._pins = SlotPins(pins, spec.source_slots)

    def publish_layer(self, layer: int) -> None:
        check_next_layer(layer, self._published, self.spec.num_layers)
        if self._ctl is None:
            raise RuntimeError(f"nixl transfer {self.spec.transfer_id} is closed")
        self._published += 1
        self._ctl[_PUBLISHED] = self._published

    def poll(self) -> int:
        return max(0, self._agent.acked(self.spec.transfer_id))

    def wait(self, deadline: float) -> None:
        start = time.monotonic()
        n, tid = self.spec.num_layers, self.spec.transfer_id
        done = wait_until(lambda: not 0 <= self._agent.acked(tid) < n, deadline)
        if self._agent.acked(tid) < 0:
            raise RemoteError("aborted", f"nixl transfer {tid}: the consumer gave up")
        if not done:
            raise TransferTimeout(f"nixl send {tid}", deadline - start,
                                  f"consumer acks for {describe_pending(list(range(self.poll(), n)))}")

    def close(self) -> None:
        if self._ctl is None:
            return
        if self._agent.acked(self.spec.transfer_id) != self.spec.num_layers:
            self._ctl[_STATE] = _PRODUCER_ABORTED
        self._agent.close_send(self.spec.transfer_id)
        self._agent.release(self._regions)
        self._ctl = None
        self._pins.release()


class NixlRecvHandle(RecvHandle):
    """Consumer side: READs the control block, then every newly published layer, in one request each."""

    def __init__(self, agent: NixlAgent, spec: NixlTransferSpec, dest: LayerBuffers) -> None:
        self.spec = spec
        self.num_layers = spec.num_layers
        self._agent = agent
        self._remote = agent.load_remote(spec.agent_metadata)
        self._pieces = [pair_runs(_layer_addrs(dest, i), spec.layer_addrs[i]) for i in range(spec.num_layers)]
        self._ctl = np.zeros(_CTL_WORDS, dtype=np.int64)
        self._regions: list[Region] | None = agent.register([*_regions(dest), (self._ctl.ctypes.data, self._ctl.nbytes)])
        try:
            self._ctl_read = agent.read([(self._ctl.ctypes.data, spec.control_addr, self._ctl.nbytes)], self._remote, b"")
        except BaseException:
            agent.release(self._regions)
            raise
        self._ctl_busy = False
        self._data_read: Any = None
        self._target = self._copied = 0

    def poll(self) -> int:
        if self._regions is not None and self._copied < self.num_layers:
            self._step()
        return self._copied

    def _check(self, state: str, what: str) -> bool:
        if state == "ERR":
            raise RemoteError("transfer", f"nixl transfer {self.spec.transfer_id}: READ of {what} failed")
        return state == "DONE"

    def _step(self) -> bool:
        """Advances the transfer by one non-blocking step; True when layers arrived."""
        tid = self.spec.transfer_id
        if self._data_read is not None:
            if not self._check(self._agent.state(self._data_read), describe_pending(list(range(self._copied, self._target)))):
                return False
            read, self._data_read = self._data_read, None
            self._agent.finish(read)
            self._copied = self._target
            return True
        if not self._ctl_busy:
            self._ctl_busy = not self._check(self._agent.post(self._ctl_read), "the control block")
        elif self._check(self._agent.state(self._ctl_read), "the control block"):
            self._ctl_busy = False
        if self._ctl_busy:
            return False
        if int(self._ctl[_MAGIC]) != _CTL_MAGIC or int(self._ctl[_STATE]) == _PRODUCER_ABORTED:
            raise RemoteError("aborted", f"nixl transfer {tid}: the producer gave up")
        published = min(int(self._ctl[_PUBLISHED]), self.num_layers)
        if published > self._copied:
            pieces = [p for i in range(self._copied, published) for p in self._pieces[i]]
            self._target = published
            self._data_read = self._agent.read(pieces, self._remote, f"{tid}:{published}".encode())
            self._check(self._agent.post(self._data_read), describe_pending(list(range(self._copied, published))))
        return False

    def wait_layer(self, layer: int, deadline: float) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: {layer} out of range [0, {self.num_layers})")
        if self._regions is None:
            raise RuntimeError(f"nixl transfer {self.spec.transfer_id} is closed")
        start = time.monotonic()
        if not wait_until(lambda: self._copied > layer or (self._step() and self._copied > layer), deadline):
            raise TransferTimeout(f"nixl recv {self.spec.transfer_id}", deadline - start,
                                  describe_pending(list(range(self._copied, layer + 1))))

    def close(self) -> None:
        if self._regions is None:
            return
        for read in (self._data_read, self._ctl_read):
            if read is not None:
                self._agent.finish(read)
        self._data_read = None
        if self._copied < self.num_layers:
            self._agent.notify(self._remote, f"{self.spec.transfer_id}:abort".encode())
        regions, self._regions = self._regions, None
        self._agent.release(regions)


class NixlTransport(Transport):
    """Layer-wise transfers over NIXL (host memory, UCX backend); owns one agent until ``close()``.

    ``start_send`` takes a plain TransferSpec (transfer_id, num_layers, layer_nbytes; source_slots
    when ``pins`` is given) and returns a handle whose ``spec`` the consumer passes to
    ``start_recv``. TransportUnavailable when nixl is missing or has no UCX backend here.
    """

    name = "nixl"
    package = "nixl"

    def __init__(self) -> None:
        self._agent: NixlAgent | None = NixlAgent()

    @classmethod
    def available(cls) -> bool:
        return nixl_available()

    @classmethod
    def from_options(cls, options: TransportOptions) -> NixlTransport:
        """One agent (the options' deadlines are per call here); TransportUnavailable without nixl."""
        return cls()

    @property
    def agent(self) -> NixlAgent:
        if self._agent is None:
            raise RuntimeError("nixl transport is closed")
        return self._agent

    @property
    def num_registered(self) -> int:
        """Memory regions registered with the agent now (0 once every handle is closed)."""
        return self.agent.num_registered

    def start_send(self, spec: TransferSpec, source: LayerBuffers, pins: SlotAllocator | None = None) -> NixlSendHandle:
        if not spec.transfer_id:
            raise ValueError("spec.transfer_id: nixl needs a transfer id (pulls by handle are not supported)")
        spec.check_buffers(source, "source")
        return NixlSendHandle(self.agent, spec, source, pins)

    def start_recv(self, spec: TransferSpec, dest: LayerBuffers) -> NixlRecvHandle:
        if not isinstance(spec, NixlTransferSpec):
            raise ValueError(f"spec: nixl needs the NixlTransferSpec from the send handle, got {type(spec).__name__}")
        spec.check_buffers(dest, "dest")
        return NixlRecvHandle(self.agent, spec, dest)

    def close(self) -> None:
        agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()
