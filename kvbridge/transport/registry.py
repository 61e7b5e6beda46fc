"""Transport registry: name -> class, the only way a node opens a transport.

Optional transports (nixl, deepep) import their package only when asked for by name, so a
node on a machine without them never imports them; ``is_available`` says whether one's
package imports here. ``open_transport`` builds a transport from TransportOptions alone
(shm, tcp, nixl); one that needs more (deepep's process group) is built from its class.
"""

from __future__ import annotations

import importlib

from kvbridge.errors import TransportUnavailable
from kvbridge.transport.base import Transport, TransportOptions

__all__ = ["TransportOptions", "get_transport", "is_available", "open_transport", "register_transport",
           "transport_names"]

_BUILTIN: dict[str, str] = {
    "shm": "kvbridge.transport.shm:ShmTransport",
    "tcp": "kvbridge.transport.tcp:TcpTransport",
    "nixl": "kvbridge.transport.nixl:NixlTransport",
    "deepep": "kvbridge.transport.deepep:DeepEPTransport",
}
_EXTRA: dict[str, type[Transport]] = {}


def register_transport(name: str, cls: type[Transport]) -> None:
    if name in _BUILTIN or name in _EXTRA:
        raise ValueError(f"name: transport {name!r} is already registered")
    _EXTRA[name] = cls


def transport_names() -> list[str]:
    return sorted([*_BUILTIN, *_EXTRA])


def get_transport(name: str) -> type[Transport]:
    """The class registered under ``name``; ValueError listing the known names otherwise."""
    if name in _EXTRA:
        return _EXTRA[name]
    target = _BUILTIN.get(name)
    if target is None:
        raise ValueError(f"name: unknown transport {name!r} (known: {transport_names()})")
    module, _, attr = target.partition(":")
    cls: type[Transport] = getattr(importlib.import_module(module), attr)
    return cls


def is_available(name: str) -> bool:
    """Whether transport ``name``'s optional package (if any) is installed here; ValueError
    for an unknown name. Does not import that package."""
    try:
        return get_transport(name).available()
    except (ImportError, TransportUnavailable):
        return False


def open_transport(name: str, options: TransportOptions) -> Transport:
    """A new transport ``name`` (the caller closes it). ValueError for an unknown name or one
    that needs more than ``options``; TransportUnavailable when its package is missing."""
    return get_transport(name).from_options(options)
