"""SamplingParams on the worker wire: one row per field, read by everything that carries one.

A row names the SamplingParams field, the worker tensor that carries it (TensorRT-LLM's core
names), its Triton type and dims, and, for numbers, the range the wire can carry. From this
table come the worker request tensors (``encode``, orchestrator side), their parsing (``decode``,
worker side), the worker models' declared inputs (specs.WORKER_INPUTS) and the orchestrator's
range check (wire_bounds.check). A new sampling parameter is one row here, its field in
SamplingParams and its use in the sampler (plus its public name where the public APIs parse it).

Kinds by type and dims: a scalar (dims (1,)) is an INT32 / UINT64 / FP32 / BOOL array of one
value; INT32 (-1,) is a list of token ids; STRING (-1,) a list of strings; INT32 (2, -1)
TensorRT-LLM's word list (row 0 the words' ids concatenated, row 1 each word's end offset,
padded with -1). A field whose value is None (seed) is not sent; a missing tensor reads as the
SamplingParams default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from backends.engine.sampling_params import SamplingParams

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
FP32_MAX = 3.4028234663852886e38
FP32_MIN_NORMAL = 1.1754943508222875e-38


@dataclass(frozen=True, slots=True)
class WireField:
    """SamplingParams.``param`` as worker tensor ``tensor``; numbers (each element of a token
    id list) must lie in [low, high] to cross as ``data_type``."""

    param: str
    tensor: str
    data_type: str  # TYPE_*
    dims: tuple[int, ...] = (1,)
    low: float | None = None
    high: float | None = None

    @property
    def wire(self) -> str:
        return self.data_type.removeprefix("TYPE_")


SAMPLING_FIELDS = (
    WireField("max_tokens", "request_output_len", "TYPE_INT32", low=1, high=INT32_MAX),
    WireField("temperature", "temperature", "TYPE_FP32", low=0.0, high=FP32_MAX),
    WireField("top_k", "runtime_top_k", "TYPE_INT32", low=0, high=INT32_MAX),
    # (0, 1] by the engine's rule; below the smallest FP32 normal it would arrive as 0
    WireField("top_p", "runtime_top_p", "TYPE_FP32", low=FP32_MIN_NORMAL, high=1.0),
    WireField("min_tokens", "min_tokens", "TYPE_INT32", low=0, high=INT32_MAX),
    WireField("seed", "random_seed", "TYPE_UINT64", low=0, high=UINT64_MAX),
    WireField("ignore_eos", "ignore_eos", "TYPE_BOOL"),
    WireField("logprobs", "return_log_probs", "TYPE_BOOL"),
    WireField("stop_token_ids", "stop_token_ids", "TYPE_INT32", (-1,), low=0, high=INT32_MAX),
    WireField("stop", "stop_words", "TYPE_STRING", (-1,)),
    WireField("repetition_penalty", "repetition_penalty", "TYPE_FP32", low=FP32_MIN_NORMAL, high=FP32_MAX),
    WireField("presence_penalty", "presence_penalty", "TYPE_FP32", low=-2.0, high=2.0),
    WireField("frequency_penalty", "frequency_penalty", "TYPE_FP32", low=-2.0, high=2.0),
    WireField("min_p", "min_p", "TYPE_FP32", low=0.0, high=1.0),
    WireField("bad_words_ids", "bad_words_list", "TYPE_INT32", (2, -1)),
)
_NUMPY = {"TYPE_INT32": np.int32, "TYPE_UINT64": np.uint64, "TYPE_FP32": np.float32, "TYPE_BOOL": bool}
_DEFAULTS = SamplingParams()
_PARAMS = {f.name for f in fields(SamplingParams)}
assert {f.param for f in SAMPLING_FIELDS} <= _PARAMS, "a wire field names no SamplingParams field"


def encode(params: SamplingParams) -> dict[str, np.ndarray]:
    """The worker tensors of ``params`` (a None field is left out)."""
    tensors = {}
    for f in SAMPLING_FIELDS:
        value = getattr(params, f.param)
        if value is not None:
            tensors[f.tensor] = _encode(f, value)
    return tensors


def decode(inputs: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from worker tensors; a missing or empty tensor reads as the default.
    ValueError names the tensor whose layout is wrong."""
    values = {}
    for f in SAMPLING_FIELDS:
        array = inputs.get(f.tensor)
        if array is not None and np.asarray(array).size:
            values[f.param] = _decode(f, np.asarray(array))
    return SamplingParams(**values)


def _encode(f: WireField, value: Any) -> np.ndarray:
    if f.dims == (2, -1):
        return words_list(value)
    if f.data_type == "TYPE_STRING":
        return np.array([s.encode() for s in value] or [b""], dtype=np.object_)
    if f.dims == (-1,):
        return np.asarray(value, dtype=_NUMPY[f.data_type]).reshape(-1)
    return np.array([value], dtype=_NUMPY[f.data_type])


def _decode(f: WireField, array: np.ndarray) -> Any:
    if f.dims == (2, -1):
        return parse_words_list(array)
    flat = array.reshape(-1)
    if f.data_type == "TYPE_STRING":
        return tuple(w.decode() if isinstance(w, bytes) else str(w) for w in flat if w)
    if f.dims == (-1,):
        return tuple(int(t) for t in flat)
    return type(getattr(_DEFAULTS, f.param) if f.param != "seed" else 0)(flat[0].item())


def words_list(words: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Token-id words → TensorRT-LLM's [2, n] word list (ids; end offsets padded with -1)."""
    flat = [t for w in words for t in w]
    ends = np.cumsum([len(w) for w in words], dtype=np.int64).tolist()
    return np.array([flat, ends + [-1] * (len(flat) - len(ends))], dtype=np.int32).reshape(2, -1)


def parse_words_list(array: np.ndarray | None) -> tuple[tuple[int, ...], ...]:
    """The inverse of ``words_list``; ValueError names the tensor when the layout is wrong."""
    if array is None or array.size == 0:
        return ()
    rows = np.asarray(array).reshape(2, -1) if array.size % 2 == 0 else None
    if rows is None:
        raise ValueError(f"bad_words_list: expected shape [2, n], got {list(np.shape(array))}")
    ids, ends = rows[0].tolist(), [e for e in rows[1].tolist() if e >= 0]
    if ends != sorted(ends) or (ends and ends[-1] != len(ids)) or 0 in ends:
        raise ValueError(f"bad_words_list: bad end offsets {rows[1].tolist()} for {len(ids)} ids")
    starts = [0, *ends[:-1]]
    return tuple(tuple(ids[a:b]) for a, b in zip(starts, ends, strict=True))
