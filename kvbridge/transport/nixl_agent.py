"""One NIXL agent for the nixl transport (see nixl.py): creation behind the import guard,
reference-counted memory registration, READ requests, and the producer's per-transfer acks.

Every call into the agent goes through one lock (the agent runs with NIXL's default
``NIXL_THREAD_SYNC_NONE``). Addresses are host virtual addresses (``DRAM_SEG``, device id 0).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbridge.errors import TransportUnavailable
from kvbridge.transport.base import wait_until
from kvbridge.transport.regions import overlaps

CLOSE_WAIT_S = 5.0

Region = tuple[int, int]  # (address, nbytes)


# The ``nixl`` meta package picks the build matching the process's CUDA; without it, a build
# wheel alone (``pip install nixl-cu12``: no torch import, no second CUDA build) is enough.
_MODULES = ("nixl", "nixl_cu13", "nixl_cu12")


def _module_name() -> str | None:
    return next((m for m in _MODULES if importlib.util.find_spec(m) is not None), None)


def nixl_available() -> bool:
    return _module_name() is not None


def new_agent(name: str) -> Any:
    """A NIXL agent with a UCX backend; TransportUnavailable saying why when there is none."""
    module = _module_name()
    if module is None:
        raise TransportUnavailable("transport 'nixl' needs the 'nixl' package (pip install nixl-cu12), not installed")
    try:
        api = importlib.import_module(f"{module}._api")
    except ImportError as exc:
        raise TransportUnavailable(f"transport 'nixl': {module!r} is installed but does not import: {exc}") from exc
    try:
        agent = api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
    except Exception as exc:  # the bindings raise their own classes (nixlBackendError, ...)
        raise TransportUnavailable(f"transport 'nixl': could not create a NIXL agent: {exc}") from exc
    if "UCX" not in agent.backends:
        raise TransportUnavailable(
            f"transport 'nixl': {module} found but NIXL could not create a UCX backend here "
            f"(plugins: {agent.get_plugin_list()})")
    return agent


def pair_runs(local: Sequence[Region], remote: Sequence[Region]) -> list[tuple[int, int, int]]:
    """(local_addr, remote_addr, nbytes) pieces covering two splits of the same bytes, in order."""
    pieces = overlaps([n for _, n in local], [n for _, n in remote], "dest: source and destination layers differ in size")
    return [(local[li][0] + l_off, remote[ri][0] + r_off, take) for li, l_off, ri, r_off, take in pieces]


class NixlAgent:
    """One NIXL agent behind a lock: refcounted registrations, READs, and per-transfer acks."""

    def __init__(self) -> None:
        self.name = f"kvb-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._agent = new_agent(self.name)
        self._lock = threading.Lock()
        self._regs: dict[Region, tuple[int, Any]] = {}
        self._acks: dict[str, int] = {}  # open send transfer id -> layers acked (-1: consumer aborted)

    def register(self, regions: Sequence[Region]) -> list[Region]:
        """Registers ``regions`` (or takes one more reference); all or none of them."""
        done: list[Region] = []
        try:
            for region in regions:
                with self._lock:
                    count, descs = self._regs.get(region, (0, None))
                    if descs is None:
                        table = np.array([[region[0], region[1], 0]], dtype=np.uint64)
                        descs = self._agent.register_memory(table, "DRAM")
                    self._regs[region] = (count + 1, descs)
                done.append(region)
        except BaseException:
            self.release(done)
            raise
        return done

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
        deadline = time.monotonic() + CLOSE_WAIT_S
        if not wait_until(lambda: self.state(xfer) != "PROC", deadline):
            raise RuntimeError(f"nixl: a READ still in flight after {CLOSE_WAIT_S}s; its memory stays registered")
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


