"""Parsing public requests (``llm`` and ``ensemble`` tensors) into a typed GenerateRequest.

Inputs arrive as a mapping from tensor name to numpy array (only the tensors the client sent).
Every caller mistake raises ValueError whose message starts with the offending field's name,
which the backend turns into an INVALID_ARG response.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import numpy as np

from backends.engine.sampling_params import SamplingParams
from backends.serving import wire_bounds

Inputs = Mapping[str, np.ndarray]
Api = Literal["llm", "ensemble"]

DEFAULT_MAX_TOKENS = 16

# vLLM SamplingParams keys we honour.
_LLM_SUPPORTED = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                  "min_tokens", "ignore_eos", "logprobs", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "min_p", "bad_words", "apply_chat_template"}
# vLLM keys accepted only at their no-op value (clients send them by habit).
_LLM_NOOP = {"n": 1, "best_of": 1, "skip_special_tokens": True, "detokenize": True,
             "spaces_between_special_tokens": True, "include_stop_str_in_output": False,
             "length_penalty": 1.0}
# ensemble inputs accepted only at their no-op value.
_ENSEMBLE_NOOP = {"beam_width": 1, "num_return_sequences": 1,
                  "return_context_logits": False, "return_generation_logits": False}


@dataclass(frozen=True, slots=True)
class Limits:
    """Server-side bounds a request is checked against (model length comes later, with tokens)."""

    max_tokens: int = 4096
    default_max_tokens: int = DEFAULT_MAX_TOKENS


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One parsed generation request, whichever public model it came through.

    ``return_*`` flags say which optional outputs a public model sends. The ensemble always
    sends text_output, finish_reason, num_input_tokens and num_output_tokens, and, as
    tensorrtllm_backend does, the log probs, KV reuse stats and perf timestamps only when asked
    (return_log_probs, return_kv_cache_reuse_stats, return_perf_metrics). ``bad_words``
    are the client's words, not yet tokenized: ``with_bad_words_ids`` turns them into
    ``params.bad_words_ids`` once the model's tokenizer is at hand. ``chat``: ``prompt`` is a
    conversation still to be rendered with the model's chat template (serving/chat.py).
    """

    api: Api
    prompt: str
    params: SamplingParams
    stream: bool
    exclude_input_in_output: bool
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    return_logprobs: bool = False
    return_kv_cache_reuse_stats: bool = False
    return_perf_metrics: bool = False
    bad_words: tuple[str, ...] = ()
    chat: bool = False


class WordTokenizer(Protocol):
    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


def with_bad_words_ids(req: GenerateRequest, tokenizer: WordTokenizer) -> GenerateRequest:
    """``req`` with each of its ``bad_words`` tokenized into ``params.bad_words_ids``.

    As TensorRT-LLM does: each word is encoded on its own, without special tokens (a BOS the
    tokenizer prepends is dropped); a word that encodes to no token is a ValueError.
    """
    if not req.bad_words:
        return req
    ids: list[tuple[int, ...]] = []
    for word in req.bad_words:
        tokens = tokenizer.encode(word)
        if tokens and tokens[0] == tokenizer.bos_token_id:
            tokens = tokens[1:]
        if not tokens:
            raise ValueError(f"bad_words: {word!r} encodes to no tokens")
        ids.append(tuple(tokens))
    return replace(req, params=replace(req.params, bad_words_ids=tuple(ids)))


def _first(inputs: Inputs, name: str) -> Any | None:
    array = inputs.get(name)
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    if flat.size == 0:
        raise ValueError(f"{name}: tensor is empty")
    return flat[0]


def _text(inputs: Inputs, name: str) -> str | None:
    value = _first(inputs, name)
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name}: not valid UTF-8 ({exc.reason})") from None
    if isinstance(value, str):
        return value
    raise ValueError(f"{name}: expected a string, got {type(value).__name__}")


def _bool(inputs: Inputs, name: str) -> bool | None:
    value = _first(inputs, name)
    return None if value is None else bool(value)


def _int(inputs: Inputs, name: str) -> int | None:
    value = _first(inputs, name)
    if value is None:
        return None
    if not isinstance(value, np.integer | int) or isinstance(value, bool | np.bool_):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return int(value)


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def _float(inputs: Inputs, name: str, default: float) -> float:
    value = _first(inputs, name)
    if value is None:
        return default
    if not isinstance(value, np.number | int | float) or isinstance(value, bool | np.bool_):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    return _finite(float(value), name)


def _strings(inputs: Inputs, name: str) -> tuple[str, ...]:
    array = inputs.get(name)
    if array is None:
        return ()
    out: list[str] = []
    for item in np.asarray(array).reshape(-1):
        text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        out.extend(s for s in text.split(",") if s)  # TensorRT-LLM's "a,b" convention
    return tuple(out)


def check_max_tokens(value: int, limits: Limits, field: str) -> int:
    if value <= 0:
        raise ValueError(f"{field} must be > 0, got {value}")
    if value > limits.max_tokens:
        raise ValueError(f"{field} must be <= {limits.max_tokens}, got {value}")
    return value


# vllm_backend's own words for it (its clients may match on them)
VLLM_STREAM_WITH_INPUT = ("Error generating stream: When streaming, `exclude_input_in_output` = "
                          "False is not allowed.")


def _exclude_input(stream: bool, explicit: bool | None, api: str) -> bool:
    if stream and explicit is False:
        if api == "llm":
            raise ValueError(VLLM_STREAM_WITH_INPUT)
        raise ValueError("exclude_input_in_output: false is not supported when streaming "
                         "(stream=true); send exclude_input_in_output=true or omit it")
    return stream if explicit is None else explicit


def _require_prompt(inputs: Inputs) -> str:
    prompt = _text(inputs, "text_input")
    if prompt is None:
        raise ValueError("text_input: required input is missing")
    if not prompt:
        raise ValueError("text_input: prompt is empty")
    return prompt


def parse_sampling_parameters(raw: str | None, limits: Limits) -> SamplingParams:
    """vLLM-style ``sampling_parameters`` JSON → SamplingParams; unknown keys are errors."""
    if raw is None or not raw.strip():
        return SamplingParams(max_tokens=limits.default_max_tokens)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"sampling_parameters: not valid JSON ({exc.msg} at {exc.pos})") from None
    except RecursionError:
        raise ValueError("sampling_parameters: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"sampling_parameters: expected a JSON object, got {type(data).__name__}")
    for key, value in data.items():
        if key in _LLM_NOOP and value is not None and value != _LLM_NOOP[key]:
            raise ValueError(f"sampling_parameters.{key}: only {_LLM_NOOP[key]!r} is supported, got {value!r}")
        if key not in _LLM_SUPPORTED and key not in _LLM_NOOP:
            raise ValueError(f"sampling_parameters.{key}: unknown key")
    return _params_from_json(data, limits)


def _json_int(data: dict[str, Any], key: str, default: int) -> int:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"sampling_parameters.{key}: expected an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"sampling_parameters.{key}: expected an integer, got {value!r}") from None


def _json_float(data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        raise ValueError(f"sampling_parameters.{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"sampling_parameters.{key}: expected a number, got {value!r}") from None
    return _finite(number, f"sampling_parameters.{key}")


def _json_bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"sampling_parameters.{key}: expected true or false, got {value!r}")
    return value


def _json_words(data: dict[str, Any], key: str) -> tuple[str, ...]:
    words = data.get(key) or ()
    if isinstance(words, str):
        words = (words,)
    if not isinstance(words, list | tuple) or not all(isinstance(s, str) and s for s in words):
        raise ValueError(f"sampling_parameters.{key}: expected non-empty strings, got {words!r}")
    return tuple(words)


def _params_from_json(data: dict[str, Any], limits: Limits) -> SamplingParams:
    stop = _json_words(data, "stop")
    stop_ids = data.get("stop_token_ids") or ()
    if not isinstance(stop_ids, list | tuple) or not all(isinstance(t, int) and t >= 0 for t in stop_ids):
        raise ValueError(f"sampling_parameters.stop_token_ids: expected token ids, got {stop_ids!r}")
    top_k = _json_int(data, "top_k", 0)
    seed = data.get("seed")
    params = SamplingParams(
        max_tokens=check_max_tokens(_json_int(data, "max_tokens", limits.default_max_tokens),
                                    limits, "sampling_parameters.max_tokens"),
        temperature=_json_float(data, "temperature", 1.0),
        top_k=0 if top_k == -1 else top_k,  # vLLM's -1 means off
        top_p=_json_float(data, "top_p", 1.0),
        min_tokens=_json_int(data, "min_tokens", 0),
        seed=None if seed is None else _json_int(data, "seed", 0),
        stop_token_ids=tuple(stop_ids), stop=tuple(stop),
        ignore_eos=_json_bool(data, "ignore_eos"), logprobs=bool(data.get("logprobs")),
        repetition_penalty=_json_float(data, "repetition_penalty", 1.0),
        presence_penalty=_json_float(data, "presence_penalty", 0.0),
        frequency_penalty=_json_float(data, "frequency_penalty", 0.0),
        min_p=_json_float(data, "min_p", 0.0))
    return _checked(params, "sampling_parameters.")


def _checked(params: SamplingParams, prefix: str, names: dict[str, str] | None = None) -> SamplingParams:
    """Runs the engine's own field checks (prompt checks come later, with the tokens), then
    the worker wire's ranges (wire_bounds.py); ``names`` maps fields the caller calls otherwise."""
    try:
        params.validate(max_model_len=1 << 30, prompt_len=1)
    except ValueError as exc:
        raise ValueError(f"{prefix}{exc}") from None
    aliases = names or {}
    return wire_bounds.check(params, lambda field: prefix + aliases.get(field, field))


def parse_llm(inputs: Inputs, limits: Limits) -> GenerateRequest:
    """vllm_backend tensors → GenerateRequest."""
    prompt = _require_prompt(inputs)
    raw = _text(inputs, "sampling_parameters")
    params = parse_sampling_parameters(raw, limits)
    stream = bool(_bool(inputs, "stream"))
    return GenerateRequest(
        api="llm", prompt=prompt, params=params, stream=stream,
        exclude_input_in_output=_exclude_input(stream, _bool(inputs, "exclude_input_in_output"),
                                               "llm"),
        return_finish_reason=bool(_bool(inputs, "return_finish_reason")),
        return_num_input_tokens=bool(_bool(inputs, "return_num_input_tokens")),
        return_num_output_tokens=bool(_bool(inputs, "return_num_output_tokens")),
        return_logprobs=bool(_bool(inputs, "return_logprobs")) or params.logprobs,
        bad_words=_json_words(_llm_json(raw), "bad_words"),
        chat=_json_bool(_llm_json(raw), "apply_chat_template"))


def _llm_json(raw: str | None) -> dict[str, Any]:
    """An already validated ``sampling_parameters`` JSON object ({} when absent)."""
    return {} if raw is None or not raw.strip() else dict(json.loads(raw))


def _check_ensemble_noops(inputs: Inputs) -> None:
    for name, noop in _ENSEMBLE_NOOP.items():
        value = _first(inputs, name)
        if value is not None and value.item() != noop:
            raise ValueError(f"{name}: only {noop!r} is supported, got {value.item()!r}")


def parse_ensemble(inputs: Inputs, limits: Limits) -> GenerateRequest:
    """tensorrtllm_backend ensemble tensors (batch size 1) → GenerateRequest."""
    for name, array in inputs.items():
        if np.asarray(array).ndim >= 1 and np.asarray(array).shape[0] > 1:
            raise ValueError(f"{name}: batch size {np.asarray(array).shape[0]} > 1 is not supported")
    prompt = _require_prompt(inputs)
    _check_ensemble_noops(inputs)
    max_tokens = _int(inputs, "max_tokens")
    max_tokens = check_max_tokens(limits.default_max_tokens if max_tokens is None else max_tokens,
                                  limits, "max_tokens")
    min_name = "min_tokens" if "min_tokens" in inputs else "min_length"
    min_tokens = _int(inputs, min_name) or 0
    if not 0 <= min_tokens <= max_tokens:
        raise ValueError(f"{min_name} must be in [0, max_tokens={max_tokens}], got {min_tokens}")
    seed = _int(inputs, "seed")
    end_id = _int(inputs, "end_id")
    if end_id is not None and end_id < 0:
        raise ValueError(f"end_id must be a token id >= 0, got {end_id}")
    top_k = _int(inputs, "top_k")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_float(inputs, "temperature", 1.0),
        top_k=top_k or 0, top_p=_float(inputs, "top_p", 1.0),
        min_tokens=min_tokens,
        seed=seed if seed is not None else _int(inputs, "random_seed"),
        stop_token_ids=() if end_id is None else (end_id,),
        stop=_strings(inputs, "stop_words"),
        logprobs=bool(_bool(inputs, "return_log_probs")),
        repetition_penalty=_float(inputs, "repetition_penalty", 1.0),
        presence_penalty=_float(inputs, "presence_penalty", 0.0),
        frequency_penalty=_float(inputs, "frequency_penalty", 0.0))
    stream = bool(_bool(inputs, "stream"))
    return GenerateRequest(
        api="ensemble", prompt=prompt, stream=stream,
        params=_checked(params, "", {"min_tokens": min_name, "stop_token_ids": "end_id",
                                     "seed": "seed" if seed is not None else "random_seed"}),
        exclude_input_in_output=_exclude_input(stream, _bool(inputs, "exclude_input_in_output"),
                                               "ensemble"),
        return_finish_reason=True, return_num_input_tokens=True, return_num_output_tokens=True,
        return_logprobs=params.logprobs,
        return_kv_cache_reuse_stats=bool(_bool(inputs, "return_kv_cache_reuse_stats")),
        return_perf_metrics=bool(_bool(inputs, "return_perf_metrics")), bad_words=_strings(inputs, "bad_words"))
