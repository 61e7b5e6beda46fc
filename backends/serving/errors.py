"""Error categories of the serving layer and their Triton error codes.

Caller mistakes are ValueError (INVALID_ARG); a cancelled request is RequestCancelled
(CANCELLED); a worker that cannot serve is WorkerUnavailable (UNAVAILABLE); anything else is
INTERNAL. ``triton_error`` is the only place that builds a ``pb_utils.TritonError``.

A worker's error crosses BLS without its code: python_backend 2.51 rebuilds a BLS response's
error from the message alone (request_executor.cc ``PbError(pb_exception.what())``), so every
worker error read INTERNAL and a caller's INVALID_ARG was retried as a fault (issue 8). Workers
therefore also carry the code in the message (``worker_error``: "[INVALID_ARG] ..."), and
``split_worker_message`` takes it back out on the orchestrator's side.
"""

from __future__ import annotations

from typing import Any

INVALID_ARG = "INVALID_ARG"
CANCELLED = "CANCELLED"
UNAVAILABLE = "UNAVAILABLE"
INTERNAL = "INTERNAL"


class RequestCancelled(Exception):
    """The client cancelled the request (or the server aborted it on the client's behalf)."""


class WorkerUnavailable(RuntimeError):
    """A worker model could not take or finish the request (not a caller mistake)."""


class WorkerError(RuntimeError):
    """A worker answered with an error; ``code`` is the Triton code name it carried."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def error_code(exc: BaseException) -> str:
    """The Triton error code name for ``exc``."""
    if isinstance(exc, RequestCancelled):
        return CANCELLED
    if isinstance(exc, WorkerError):
        return exc.code
    if isinstance(exc, WorkerUnavailable):
        return UNAVAILABLE
    if isinstance(exc, ValueError):
        return INVALID_ARG
    return INTERNAL


def triton_error(pb_utils: Any, exc: BaseException) -> Any:
    """A ``pb_utils.TritonError`` carrying ``exc``'s message and code."""
    code = error_code(exc)
    return pb_utils.TritonError(str(exc) or type(exc).__name__, getattr(pb_utils.TritonError, code))


def tagged_message(exc: BaseException) -> str:
    """``exc``'s message with its code at the head ("[INVALID_ARG] ..."; split_worker_message)."""
    return f"[{error_code(exc)}] {str(exc) or type(exc).__name__}"


def worker_error(pb_utils: Any, exc: BaseException) -> Any:
    """``triton_error`` for a worker's response, its code also at the head of the message."""
    return pb_utils.TritonError(tagged_message(exc), getattr(pb_utils.TritonError, error_code(exc)))


def split_worker_message(message: str, code: str) -> tuple[str, str]:
    """(message, code) of a worker error as sent: the code at the head of ``message`` (see
    ``worker_error``) wins over ``code``, which BLS reports as INTERNAL whatever was sent."""
    for name in (INVALID_ARG, CANCELLED, UNAVAILABLE, INTERNAL):
        tag = f"[{name}] "
        if message.startswith(tag):
            return message[len(tag):], name
    return message, code


def code_name(pb_utils: Any, error: Any) -> str:
    """The code name (e.g. "INVALID_ARG") of a ``pb_utils.TritonError`` received from a model."""
    code = error.code()
    for name in (INVALID_ARG, CANCELLED, UNAVAILABLE, INTERNAL):
        if code == getattr(pb_utils.TritonError, name):
            return name
    return INTERNAL
