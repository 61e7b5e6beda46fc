"""Connection authentication: every connection opens with :class:`Hello` carrying the shared
token; a server checks it with :func:`check_hello` and refuses (:func:`check_bind`) to listen
beyond loopback without a token. This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress

from kvbridge.errors import AuthError
from kvbridge.protocol import message


@message("hello")
@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """The first frame of every connection: the shared token ('' when none) and who speaks."""

    token: str
    peer: str


@message("hello_ack")
@dataclasses.dataclass(frozen=True, slots=True)
class HelloAck:
    server: str



def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuses (ValueError) to serve beyond loopback without an authentication token."""
    if not is_loopback(host) and not token:
        raise ValueError(f"host: binding {host!r} beyond loopback requires a token (--token)")


def check_hello(msg: object, token: str | None) -> Hello:
    """Validates the first frame: a Hello carrying ``token`` (any token when none is set)."""
    if not isinstance(msg, Hello):
        raise AuthError(f"expected Hello as the first frame, got {type(msg).__name__}")
    if token and not hmac.compare_digest(msg.token.encode(), token.encode()):
        raise AuthError(f"bad token from peer {msg.peer!r}")
    return msg
