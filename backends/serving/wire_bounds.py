"""What the worker wire can carry: every numeric sampling field's range, checked in the
orchestrator before a request leaves it (issue 8).

The worker tensors (worker_io.py) are INT32 (token ids, top_k, counts), UINT64 (seed) and FP32
(temperature, top_p, penalties). A value outside them used to wrap or round on the way:
top_k 4294967297 acted as 1, stop token 4294967348 as 52, seed -1 as 2^64-1, top_p 1e-50
arrived as 0.0, temperature 1e308 as inf; 2^64 failed without naming the field. The engine's
own checks (SamplingParams.validate) say what makes sense; this table says what fits, and the
error names the field and the value as the caller sent it. The ranges are the rows of
sampling_wire.SAMPLING_FIELDS; ``check`` runs after the engine's checks.
"""

from __future__ import annotations

from collections.abc import Callable

from backends.engine.sampling_params import SamplingParams
from backends.serving.sampling_wire import (
    FP32_MAX,
    FP32_MIN_NORMAL,
    INT32_MAX,
    SAMPLING_FIELDS,
    UINT64_MAX,
    WireField,
)

__all__ = ["FP32_MAX", "FP32_MIN_NORMAL", "INT32_MAX", "UINT64_MAX", "check"]
BOUNDED = tuple(f for f in SAMPLING_FIELDS if f.low is not None)


def check(params: SamplingParams, name: Callable[[str], str]) -> SamplingParams:
    """``params`` unchanged, or ValueError for the first value the wire cannot carry.
    ``name(field)`` is the field as the caller called it (e.g. ``sampling_parameters.top_k``)."""
    for f in BOUNDED:
        value = getattr(params, f.param)
        for item in (value if isinstance(value, tuple) else (value,)):  # a token id list: each id
            if item is not None and not f.low <= item <= f.high:  # type: ignore[operator]
                raise ValueError(_message(name(f.param), f, item))
    return params


def _message(field: str, f: WireField, value: float) -> str:
    return f"{field} must be in [{f.low!r}, {f.high!r}] ({f.wire}), got {value!r}"
