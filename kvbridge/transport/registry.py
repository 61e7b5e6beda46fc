"""Transport registry: name -> class, the only way a node opens or picks a transport.

Optional transports (nixl, deepep) import their package only when asked for by name, so a
node on a machine without them never imports them; ``is_available`` says whether one's
package imports here. ``open_transport`` builds a transport from TransportOptions alone
(shm, tcp, nixl); one that needs more (deepep's process group) is built from its class.

``choose_pull_transport`` picks what moves a finished prefill's blocks to the node that pulls
them by KV handle (KVNode's pull side, pull.py): a transport named in the node's config
(``KVNodeConfig.transport`` or KVBRIDGE_TRANSPORT), or with "auto" the best one that is
installed here and can pull by handle (``Transport.pulls_by_handle``), optional ones first
(nixl, deepep), then shm when the producer's pool is on this host, else tcp. The choice says
why, naming every preferred transport it passed over and the reason.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

from kvbridge.errors import TransportUnavailable
from kvbridge.transport.base import Transport, TransportOptions

__all__ = ["AUTO", "OPTIONAL_FIRST", "TRANSPORT_ENV", "TransportChoice", "TransportOptions",
           "check_transport", "choose_pull_transport", "get_transport", "is_available", "open_transport",
           "register_transport", "transport_names"]

_BUILTIN: dict[str, str] = {
    "shm": "kvbridge.transport.shm:ShmTransport",
    "tcp": "kvbridge.transport.tcp:TcpTransport",
    "nixl": "kvbridge.transport.nixl:NixlTransport",
    "deepep": "kvbridge.transport.deepep:DeepEPTransport",
}
_EXTRA: dict[str, type[Transport]] = {}
AUTO = "auto"
OPTIONAL_FIRST = ("nixl", "deepep")  # what "auto" tries before shm/tcp, best first
TRANSPORT_ENV = "KVBRIDGE_TRANSPORT"


@dataclass(frozen=True, slots=True)
class TransportChoice:
    """The transport that pulls (``name``) and why (``reason``, one line for logs)."""

    name: str
    reason: str


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


@functools.cache
def _availability(name: str) -> bool:
    """``is_available`` once per process (a package does not appear or vanish while we run)."""
    return is_available(name)


def _unusable(name: str) -> str | None:
    """Why transport ``name`` cannot pull by KV handle here; None when it can."""
    cls = get_transport(name)
    if not _availability(name):
        return f"{name!r} needs the {cls.package or name} package, which is not installed"
    if not cls.pulls_by_handle:
        return f"{name!r} is installed but cannot pull KV by handle yet (it moves published transfers only)"
    return None


def check_transport(wanted: str, field: str = "transport") -> None:
    """Whether ``wanted`` ("auto" or a transport name) can serve a node's pulls: ValueError
    naming ``field`` for an unknown name or one that cannot pull by handle, TransportUnavailable
    naming ``field`` and the package for an optional one that is not installed."""
    if wanted == AUTO:
        return
    if wanted not in transport_names():
        raise ValueError(f"{field}: expected {AUTO!r} or one of {transport_names()}, got {wanted!r}")
    problem = _unusable(wanted)
    if problem is None:
        return
    if not _availability(wanted):
        raise TransportUnavailable(f"{field}: {problem}")
    raise ValueError(f"{field}: {problem}; use {AUTO!r}, 'shm' or 'tcp'")


@functools.cache
def choose_pull_transport(wanted: str, same_host: bool) -> TransportChoice:
    """The transport that pulls a handle's blocks for a node configured with ``wanted`` (see the
    module docstring); ``same_host``: the producer's pool is a shared-memory file of this host.
    A named transport is used as named, except shm for a pool on another host (then tcp).
    Raises as ``check_transport`` does for a ``wanted`` that cannot serve."""
    check_transport(wanted)
    local = "shm" if same_host else "tcp"
    where = "the producer's pool is on this host" if same_host else "the producer is on another host"
    if wanted == "shm" and not same_host:
        return TransportChoice("tcp", f"tcp: configured shm, but {where}")
    if wanted != AUTO:
        return TransportChoice(wanted, f"{wanted}: configured")
    passed = []
    for name in OPTIONAL_FIRST:
        problem = _unusable(name)
        if problem is None:
            return TransportChoice(name, f"{name}: installed and pulls by handle")
        passed.append(problem)
    return TransportChoice(local, f"{local}: {where} ({'; '.join(passed)})")
