"""kvbridge's error hierarchy: remote and transport failures, kept apart from caller mistakes.

Caller mistakes elsewhere raise ValueError; broken invariants raise RuntimeError. Everything a
peer, the wire or the clock can cause derives from KVBridgeError, so a serving layer can catch
one class and degrade to recompute.
"""

from __future__ import annotations

from collections.abc import Sequence


class KVBridgeError(Exception):
    """Base of every failure caused by a peer, the wire or a deadline."""


class ProtocolError(KVBridgeError):
    """A malformed, oversized, wrong-version or unexpected frame."""


class PeerClosed(ProtocolError):
    """The peer closed the connection at a frame boundary (a normal end, not a fault)."""


class ChecksumMismatch(ProtocolError):
    """Bytes received do not hash to what the sender said: corrupted on the way; never use them."""


class AuthError(KVBridgeError):
    """A peer did not authenticate (missing or wrong token)."""


class RemoteError(KVBridgeError):
    """The peer answered with an error; ``code`` is its category, the message its text."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"remote error [{code}]: {message}")
        self.code = code
        self.remote_message = message


class StaleSlots(KVBridgeError):
    """Pool slots a KV handle names were freed (and maybe handed to another sequence) since the
    handle was built: their blocks are not the handle's KV any more. Nothing was pinned.

    The message names the first stale slot, the generation the handle expected and the slot's
    current one (and says when the slot is free). A block server answers it with
    ErrorReply("stale", message), which its client raises as RemoteError("stale", ...).
    """

    def __init__(self, slot: int, expected: int, current: int, *, allocated: bool) -> None:
        state = "" if allocated else " (free)"
        super().__init__(f"stale slot {slot}: expected generation {expected}, current generation {current}{state}")
        self.slot = slot
        self.expected = expected
        self.current = current
        self.allocated = allocated


class TransportUnavailable(KVBridgeError):
    """A transport's optional package is not installed (e.g. nixl, deep_ep)."""


class TransferTimeout(KVBridgeError, TimeoutError):
    """A transfer or request did not finish before its deadline.

    The message names the operation, the deadline (seconds it allowed) and what was pending.
    """

    def __init__(self, what: str, timeout_s: float, pending: str) -> None:
        super().__init__(f"{what} timed out after {timeout_s:.3f}s; pending: {pending}")
        self.what = what
        self.timeout_s = timeout_s
        self.pending = pending


class PullFailed(KVBridgeError):
    """A KV source could not deliver the KV it promised: its pull failed, a deadline passed, the
    peer holds less than it said, or the source was closed. The consumer recomputes instead."""


class LayoutMismatch(KVBridgeError, ValueError):
    """A KV handle's layout differs from the consumer's: refusing it beats decoding garbage KV."""

    def __init__(self, field: str, got: object, expected: object) -> None:
        super().__init__(f"KV layout mismatch in {field}: handle has {got!r}, expected {expected!r}")
        self.field = field
        self.got = got
        self.expected = expected


def describe_pending(layers: Sequence[int], limit: int = 8) -> str:
    """A short human description of the layers still pending (for timeout messages)."""
    if not layers:
        return "nothing"
    shown = ", ".join(str(i) for i in layers[:limit])
    more = f" (+{len(layers) - limit} more)" if len(layers) > limit else ""
    return f"layers [{shown}]{more}"
