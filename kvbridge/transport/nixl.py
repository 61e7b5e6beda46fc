"""NIXL transport: the consumer READs each published layer straight out of the producer's memory.

Works on host memory (NIXL ``DRAM_SEG`` over its UCX backend: shm/cma on one host, tcp or RDMA
across hosts); tested here between two CPU-only processes with ``nixl-cu12``. Each transport owns
one NIXL agent. Protocol, one-sided from the consumer:

* ``start_send`` registers the source memory and a 64-byte control block (int64 words: magic,
  published, state) with the agent; the returned handle's ``spec`` is a :class:`NixlTransferSpec`
  (the caller's spec plus the agent's metadata and the remote addresses) — that is what the
  consumer needs. ``publish_layer`` bumps *published* after the layer's bytes are written.
* The consumer loads the producer's metadata, READs the control block, and READs layers
  [received, published) into its destination in one NIXL request whose completion notification
  (``"<transfer_id>:<layers>"``) acks them to the producer; ``close()`` before the end sends
  ``"<transfer_id>:abort"``. A producer that closes early sets *state* so the consumer fails fast.

Ownership: registrations are reference-counted per (address, size) and released by the handle's
``close()``; the transport's ``close()`` releases the agent. A transfer still in flight at close
is waited for (bounded) before its destination is deregistered, never abandoned mid-write.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbridge.errors import RemoteError, TransferTimeout, TransportUnavailable, describe_pending
from kvbridge.pool import SlotAllocator
from kvbridge.transport.base import (
    LayerBuffers,
    PoolRegion,
    RecvHandle,
    SendHandle,
    TransferSpec,
    Transport,
)

_CTL_MAGIC = 0x4B56424E49584C31  # "KVBNIXL1"
_MAGIC, _PUBLISHED, _STATE = range(3)
_RUNNING, _PRODUCER_ABORTED = 0, 1
_CTL_WORDS = 8
_CLOSE_WAIT_S = 5.0

Region = tuple[int, int]  # (address, nbytes)


def nixl_available() -> bool:
    return importlib.util.find_spec("nixl") is not None


def _new_agent(name: str) -> Any:
    """A NIXL agent with a UCX backend; TransportUnavailable saying why when there is none."""
    if not nixl_available():
        raise TransportUnavailable("transport 'nixl' needs the 'nixl' package (pip install nixl-cu12), not installed")
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as exc:
        raise TransportUnavailable(f"transport 'nixl': the 'nixl' package is installed but does not import: {exc}") from exc
    try:
        agent = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
    except Exception as exc:  # the bindings raise their own classes (nixlBackendError, ...)
        raise TransportUnavailable(f"transport 'nixl': could not create a NIXL agent: {exc}") from exc
    if "UCX" not in agent.backends:
        raise TransportUnavailable(
            f"transport 'nixl': NIXL has no UCX backend here (plugins: {agent.get_plugin_list()})")
    return agent


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


def pair_runs(local: Sequence[Region], remote: Sequence[Region]) -> list[tuple[int, int, int]]:
    """(local_addr, remote_addr, nbytes) pieces covering two splits of the same bytes, in order."""
    pieces: list[tuple[int, int, int]] = []
    li = ri = l_off = r_off = 0
    while li < len(local) and ri < len(remote):
        take = min(local[li][1] - l_off, remote[ri][1] - r_off)
        pieces.append((local[li][0] + l_off, remote[ri][0] + r_off, take))
        l_off += take
        r_off += take
        if l_off == local[li][1]:
            li, l_off = li + 1, 0
        if r_off == remote[ri][1]:
            ri, r_off = ri + 1, 0
    if li != len(local) or ri != len(remote):
        raise ValueError("dest: source and destination layers differ in size")
    return pieces


def _wait_until(ready: Callable[[], bool], deadline: float) -> bool:
    """Polls ``ready`` with a short exponential backoff (20 us .. 1 ms) until the deadline."""
    pause = 2e-5
    while not ready():
        if time.monotonic() >= deadline:
            return ready()
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
    return True


class _Agent:
    """One NIXL agent behind a lock: refcounted registrations, READs, and per-transfer acks."""

    def __init__(self) -> None:
        self.name = f"kvb-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._agent = _new_agent(self.name)
        self._lock = threading.Lock()
        self._regs: dict[Region, tuple[int, Any]] = {}
        self._acks: dict[str, int] = {}  # open send transfer id -> layers acked (-1: consumer aborted)

    def register(self, regions: Sequence[Region]) -> list[Region]:
        with self._lock:
            for region in regions:
                count, descs = self._regs.get(region, (0, None))
                if descs is None:
                    table = np.array([[region[0], region[1], 0]], dtype=np.uint64)
                    descs = self._agent.register_memory(table, "DRAM")
                self._regs[region] = (count + 1, descs)
        return list(regions)

    def release(self, regions: Sequence[Region]) -> None:
        with self._lock:
            for region in regions:
                count, descs = self._regs[region]
                if count > 1:
                    self._regs[region] = (count - 1, descs)
                else:
                    del self._regs[region]
                    self._agent.deregister_memory(descs)

    @property
    def num_registered(self) -> int:
        return len(self._regs)

    def metadata(self) -> bytes:
        with self._lock:
            data: bytes = self._agent.get_agent_metadata()
            return data

    def load_remote(self, metadata: bytes) -> str:
        """Loads (or refreshes: new registrations) a producer's metadata; returns its agent name."""
        with self._lock:
            name = self._agent.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else str(name)

    def read(self, pieces: Sequence[tuple[int, int, int]], remote: str, notif: bytes) -> Any:
        """Creates a READ request of remote -> local ``pieces``; post it with :meth:`post`."""
        local = np.array([[la, n, 0] for la, _, n in pieces], dtype=np.uint64)
        far = np.array([[ra, n, 0] for _, ra, n in pieces], dtype=np.uint64)
        with self._lock:
            return self._agent.initialize_xfer(
                "READ", self._agent.get_xfer_descs(local, "DRAM"), self._agent.get_xfer_descs(far, "DRAM"),
                remote, notif)

    def post(self, xfer: Any) -> str:
        with self._lock:
            state: str = self._agent.transfer(xfer)
            return state

    def state(self, xfer: Any) -> str:
        with self._lock:
            state: str = self._agent.check_xfer_state(xfer)
            return state

    def finish(self, xfer: Any) -> None:
        """Releases a request, first letting an in-flight one complete (bounded)."""
        deadline = time.monotonic() + _CLOSE_WAIT_S
        if not _wait_until(lambda: self.state(xfer) != "PROC", deadline):
            raise RuntimeError(f"nixl: a READ still in flight after {_CLOSE_WAIT_S}s; its memory stays registered")
        with self._lock:
            xfer.release()

    def notify(self, remote: str, message: bytes) -> None:
        with self._lock:
            self._agent.send_notif(remote, message)

    def open_send(self, transfer_id: str) -> None:
        with self._lock:
            if transfer_id in self._acks:
                raise ValueError(f"spec.transfer_id: {transfer_id!r} is already being sent by this transport")
            self._acks[transfer_id] = 0

    def close_send(self, transfer_id: str) -> None:
        with self._lock:
            self._acks.pop(transfer_id, None)

    def acked(self, transfer_id: str) -> int:
        """Layers the consumer acked for an open send (-1 once it aborted); drains notifications."""
        with self._lock:
            for messages in self._agent.get_new_notifs().values():
                for message in messages:
                    tid, _, what = bytes(message).decode(errors="replace").rpartition(":")
                    if tid not in self._acks or self._acks[tid] < 0:
                        continue  # a closed transfer's late notification, or one after an abort
                    if what == "abort":
                        self._acks[tid] = -1
                    elif what.isdigit():
                        self._acks[tid] = max(self._acks[tid], int(what))
            return self._acks.get(transfer_id, 0)

    def close(self) -> None:
        with self._lock:
            regs, self._regs = self._regs, {}
            for _, descs in regs.values():
                self._agent.deregister_memory(descs)
            self._agent = None


class NixlSendHandle(SendHandle):
    """Producer side; ``spec`` (a NixlTransferSpec) is what the consumer's ``start_recv`` takes."""

    def __init__(self, agent: _Agent, spec: TransferSpec, source: LayerBuffers, pins: SlotAllocator | None) -> None:
        self._agent = agent
        self._ctl: np.ndarray | None = np.zeros(_CTL_WORDS, dtype=np.int64)
        agent.open_send(spec.transfer_id)
        self._regions = agent.register([*_regions(source), (self._ctl.ctypes.data, self._ctl.nbytes)])
        self._ctl[_MAGIC] = _CTL_MAGIC
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(TransferSpec)}
        self.spec = NixlTransferSpec(
            **fields, agent_metadata=agent.metadata(), control_addr=self._ctl.ctypes.data,
            layer_addrs=tuple(tuple(_layer_addrs(source, i)) for i in range(spec.num_layers)),
        )
        self._published = 0
        self._pins = pins
        if pins is not None:
            pins.pin(spec.source_slots)

    def publish_layer(self, layer: int) -> None:
        if layer != self._published or layer >= self.spec.num_layers:
            raise ValueError(f"layer: expected to publish layer {self._published} next, got {layer}")
        if self._ctl is None:
            raise RuntimeError(f"nixl transfer {self.spec.transfer_id} is closed")
        self._published += 1
        self._ctl[_PUBLISHED] = self._published

    def poll(self) -> int:
        return max(0, self._agent.acked(self.spec.transfer_id))

    def wait(self, deadline: float) -> None:
        start = time.monotonic()
        n, tid = self.spec.num_layers, self.spec.transfer_id
        done = _wait_until(lambda: not 0 <= self._agent.acked(tid) < n, deadline)
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
        if self._pins is not None:
            pins, self._pins = self._pins, None
            pins.unpin(self.spec.source_slots)


class NixlRecvHandle(RecvHandle):
    """Consumer side: READs the control block, then every newly published layer, in one request each."""

    def __init__(self, agent: _Agent, spec: NixlTransferSpec, dest: LayerBuffers) -> None:
        self.spec = spec
        self.num_layers = spec.num_layers
        self._agent = agent
        self._remote = agent.load_remote(spec.agent_metadata)
        self._pieces = [pair_runs(_layer_addrs(dest, i), spec.layer_addrs[i]) for i in range(spec.num_layers)]
        self._ctl = np.zeros(_CTL_WORDS, dtype=np.int64)
        self._regions: list[Region] | None = agent.register([*_regions(dest), (self._ctl.ctypes.data, self._ctl.nbytes)])
        self._ctl_read = agent.read([(self._ctl.ctypes.data, spec.control_addr, self._ctl.nbytes)], self._remote, b"")
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
        if not _wait_until(lambda: self._copied > layer or (self._step() and self._copied > layer), deadline):
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

    def __init__(self) -> None:
        self._agent: _Agent | None = _Agent()

    @property
    def agent(self) -> _Agent:
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
