"""What the worker wire can carry: every numeric sampling field's range, checked in the
orchestrator before a request leaves it (issue 8).

The worker tensors (worker_io.py) are INT32 (token ids, top_k, counts), UINT64 (seed) and FP32
(temperature, top_p, penalties). A value outside them used to wrap or round on the way:
top_k 4294967297 acted as 1, stop token 4294967348 as 52, seed -1 as 2^64-1, top_p 1e-50
arrived as 0.0, temperature 1e308 as inf; 2^64 failed without naming the field. The engine's
own checks (SamplingParams.validate) say what makes sense; this table says what fits, and the
error names the field and the value as the caller sent it. One row per field; ``check`` runs
after the engine's checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backends.engine.sampling_params import SamplingParams

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
FP32_MAX = 3.4028234663852886e38
FP32_MIN_NORMAL = 1.1754943508222875e-38


@dataclass(frozen=True, slots=True)
class Bound:
    """``field`` of SamplingParams must lie in [low, high] to cross the wire as ``wire``."""

    field: str
    low: float
    high: float
    wire: str


BOUNDS = (
    Bound("max_tokens", 1, INT32_MAX, "INT32"),
    Bound("min_tokens", 0, INT32_MAX, "INT32"),
    Bound("top_k", 0, INT32_MAX, "INT32"),
    Bound("seed", 0, UINT64_MAX, "UINT64"),
    Bound("temperature", 0.0, FP32_MAX, "FP32"),
    # (0, 1] by the engine's rule; below the smallest FP32 normal it would arrive as 0
    Bound("top_p", FP32_MIN_NORMAL, 1.0, "FP32"),
    Bound("repetition_penalty", FP32_MIN_NORMAL, FP32_MAX, "FP32"),
    Bound("presence_penalty", -2.0, 2.0, "FP32"),
    Bound("frequency_penalty", -2.0, 2.0, "FP32"),
    Bound("min_p", 0.0, 1.0, "FP32"),
)
TOKEN_ID = Bound("stop_token_ids", 0, INT32_MAX, "INT32")


def check(params: SamplingParams, name: Callable[[str], str]) -> SamplingParams:
    """``params`` unchanged, or ValueError for the first value the wire cannot carry.
    ``name(field)`` is the field as the caller called it (e.g. ``sampling_parameters.top_k``)."""
    for bound in BOUNDS:
        value = getattr(params, bound.field)
        if value is not None and not bound.low <= value <= bound.high:
            raise ValueError(_message(name(bound.field), bound, value))
    for token_id in params.stop_token_ids:
        if not TOKEN_ID.low <= token_id <= TOKEN_ID.high:
            raise ValueError(_message(name(TOKEN_ID.field), TOKEN_ID, token_id))
    return params


def _message(field: str, bound: Bound, value: float) -> str:
    return f"{field} must be in [{bound.low!r}, {bound.high!r}] ({bound.wire}), got {value!r}"
