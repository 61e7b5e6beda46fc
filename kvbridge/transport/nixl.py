"""NIXL adapter (GPU-direct RDMA between nodes) behind an import guard.

Only the guard is implemented in this build: constructing the transport without the ``nixl``
package raises TransportUnavailable naming the package; with it, the layer-wise
start_send/start_recv over NIXL descriptors is not written yet and raises the same error, so
callers fall back to tcp instead of getting a silent fake.
"""

from __future__ import annotations

import importlib.util

from kvbridge.errors import TransportUnavailable
from kvbridge.pool import SlotAllocator
from kvbridge.transport.base import LayerBuffers, RecvHandle, SendHandle, TransferSpec, Transport


def nixl_available() -> bool:
    return importlib.util.find_spec("nixl") is not None


class NixlTransport(Transport):
    name = "nixl"

    def __init__(self) -> None:
        if not nixl_available():
            raise TransportUnavailable("transport 'nixl' needs the 'nixl' package (pip install nixl), not installed")
        import nixl  # noqa: F401  (imported to fail early on a broken install)

    def start_send(self, spec: TransferSpec, source: LayerBuffers, pins: SlotAllocator | None = None) -> SendHandle:
        raise TransportUnavailable("transport 'nixl': layer-wise transfers are not implemented in this build; use tcp")

    def start_recv(self, spec: TransferSpec, dest: LayerBuffers) -> RecvHandle:
        raise TransportUnavailable("transport 'nixl': layer-wise transfers are not implemented in this build; use tcp")

    def close(self) -> None:
        pass
