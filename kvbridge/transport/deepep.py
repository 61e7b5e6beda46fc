"""DeepEP adapter (NVSHMEM-based GPU all-to-all between nodes) behind an import guard.

Only the guard is implemented in this build: constructing the transport without the ``deep_ep``
package raises TransportUnavailable naming the package; with it, the layer-wise
start_send/start_recv over DeepEP buffers is not written yet and raises the same error, so
callers fall back to tcp instead of getting a silent fake.
"""

from __future__ import annotations

import importlib.util

from kvbridge.errors import TransportUnavailable
from kvbridge.pool import SlotAllocator
from kvbridge.transport.base import LayerBuffers, RecvHandle, SendHandle, TransferSpec, Transport


def deepep_available() -> bool:
    return importlib.util.find_spec("deep_ep") is not None


class DeepEPTransport(Transport):
    name = "deepep"

    def __init__(self) -> None:
        if not deepep_available():
            raise TransportUnavailable("transport 'deepep' needs the 'deep_ep' package (DeepEP, built against NVSHMEM), not installed")
        import deep_ep  # noqa: F401  (imported to fail early on a broken install)

    def start_send(self, spec: TransferSpec, source: LayerBuffers, pins: SlotAllocator | None = None) -> SendHandle:
        raise TransportUnavailable("transport 'deepep': layer-wise transfers are not implemented in this build; use tcp")

    def start_recv(self, spec: TransferSpec, dest: LayerBuffers) -> RecvHandle:
        raise TransportUnavailable("transport 'deepep': layer-wise transfers are not implemented in this build; use tcp")

    def close(self) -> None:
        pass
