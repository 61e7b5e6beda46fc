"""Transport registry: name -> class. Optional transports import their package lazily."""

from __future__ import annotations

import importlib

from kvbridge.transport.base import Transport

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
