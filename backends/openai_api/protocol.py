"""OpenAI request bodies → one ``LlmRequest`` for tritonserver's ``llm`` model, and errors.

What this module checks: the body's shape (JSON object, ``model``, ``prompt`` / ``messages``,
``stream``, ``stream_options``) and the OpenAI parameters this server honours only at their
default (``n``, ``echo``, ``logprobs``, ...). It does not check sampling values: they go to
``llm`` as its ``sampling_parameters`` under vLLM's names, ``llm`` checks them (the bounds live
there, once), and ``LlmRequest.error_for`` turns its message back into an OpenAI error naming
the parameter the client sent. Unknown body keys are ignored, as vLLM and OpenAI do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Endpoint = Literal["completions", "chat"]
INVALID = "invalid_request_error"
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# OpenAI parameter (or vLLM extra parameter, sent with the openai client's extra_body) → the key
# of llm's sampling_parameters. max_completion_tokens is chat's newer name for max_tokens.
SAMPLING_KEYS = {
    "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
    "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "top_k": "top_k", "min_p": "min_p", "min_tokens": "min_tokens",
    "repetition_penalty": "repetition_penalty", "ignore_eos": "ignore_eos",
    "stop_token_ids": "stop_token_ids",
}
# OpenAI parameters honoured only at these values (null is always accepted).
NOOP_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,),
    "suffix": ("",), "logit_bias": ({},), "tools": ([],), "functions": ([],),
    "tool_choice": ("none",), "response_format": ({"type": "text"},),
}
_LLM_FIELD = re.compile(r"^sampling_parameters\.(\w+)")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = INVALID, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True, slots=True)
class ServedModel:
    """The Triton model the front door forwards to, as read from its config at start-up."""

    name: str
    max_tokens: int  # llm's own limit: the default when a request names none
    created: int  # unix seconds


@dataclass(frozen=True, slots=True)
class LlmRequest:
    """One OpenAI request translated for ``llm``.

    ``text_input`` is the prompt, or for chat the conversation as a JSON array of
    ``{"role", "content"}`` (``llm`` renders it with the model's chat template).
    ``sampling_parameters`` is llm's JSON text. ``param_names`` maps each of its keys back to
    the OpenAI parameter the client sent, for errors.
    """

    endpoint: Endpoint
    model: str
    text_input: str
    sampling_parameters: str
    stream: bool
    include_usage: bool
    param_names: Mapping[str, str]

    @property
    def chat(self) -> bool:
        return self.endpoint == "chat"

    def error_for(self, message: str) -> OpenAIError:
        """The OpenAI error for an ``llm`` error message: a 400 naming the OpenAI parameter when
        the message names one of llm's inputs (requests.py: caller mistakes start with the
        field's name), otherwise a 500."""
        found = _LLM_FIELD.match(message)
        if found is not None:
            param = self.param_names.get(found[1], found[1])
            return OpenAIError(400, param + message[found.end():], param)
        if message.startswith("text_input"):
            param = "messages" if self.chat else "prompt"
            return OpenAIError(400, param + message[len("text_input"):], param)
        return OpenAIError(500, message, None, "server_error")


def _type_error(name: str, expected: str, value: Any) -> OpenAIError:
    return OpenAIError(400, f"{name}: expected {expected}, got {json.dumps(value)}", name)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; OpenAIError otherwise."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_model(body: Mapping[str, Any], served: ServedModel) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise _type_error("model", "a model name", model)
    if model != served.name:
        raise OpenAIError(404, f"model: the model {model!r} does not exist; this server serves "
                          f"{served.name!r} (GET /v1/models)", "model", code="model_not_found")
    return model


def _check_noops(body: Mapping[str, Any]) -> None:
    for name, allowed in NOOP_VALUES.items():
        value = body.get(name)
        if value is not None and value not in allowed:
            raise OpenAIError(400, f"{name}: only {json.dumps(allowed[0])} is supported by this "
                              f"server, got {json.dumps(value)}", name)


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _type_error("stream", "true or false", stream)
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise OpenAIError(400, "stream_options: only allowed when stream is true, got "
                          f"{json.dumps(options)}", "stream_options")
    if not isinstance(options, dict):
        raise _type_error("stream_options", "an object", options)
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise _type_error("stream_options.include_usage", "true or false", usage)
    return True, bool(usage)


def _sampling(body: Mapping[str, Any], endpoint: Endpoint,
              served: ServedModel) -> tuple[str, dict[str, str]]:
    names = [n for n in SAMPLING_KEYS if body.get(n) is not None]
    if endpoint == "chat" and "max_completion_tokens" in names and "max_tokens" in names:
        names.remove("max_tokens")  # OpenAI: max_completion_tokens replaces max_tokens
    if endpoint == "completions" and "max_completion_tokens" in names:
        raise OpenAIError(400, "max_completion_tokens: a chat parameter; /v1/completions takes "
                          f"max_tokens, got max_completion_tokens={body['max_completion_tokens']}",
                          "max_completion_tokens")
    sampling = {SAMPLING_KEYS[n]: body[n] for n in names}
    sampling.setdefault("max_tokens", served.max_tokens)
    if endpoint == "chat":
        sampling["apply_chat_template"] = True
    param_names = {SAMPLING_KEYS[n]: n for n in names} | {"apply_chat_template": "messages"}
    return json.dumps(sampling, ensure_ascii=False), param_names


def _prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _type_error("prompt", "a non-empty string (or a list of one)", prompt)
    return prompt


def _content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _type_error(f"messages[{i}].content", "a string or a list of text parts", content)


def _conversation(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty array of messages", messages)
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _type_error(f"messages[{i}]", "an object with role and content", message)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise OpenAIError(400, f"messages[{i}].role: must be one of "
                              f"{', '.join(CHAT_ROLES)}, got {json.dumps(role)}", "messages")
        turns.append({"role": CHAT_ROLES[role], "content": _content(i, message.get("content"))})
    return json.dumps(turns, ensure_ascii=False)


def parse_request(endpoint: Endpoint, body: Mapping[str, Any], served: ServedModel) -> LlmRequest:
    """``body`` of ``POST /v1/completions`` or ``/v1/chat/completions`` → LlmRequest;
    OpenAIError naming the parameter and its value otherwise."""
    model = check_model(body, served)
    _check_noops(body)
    stream, include_usage = _stream_flags(body)
    text = _conversation(body) if endpoint == "chat" else _prompt(body)
    sampling, names = _sampling(body, endpoint, served)
    return LlmRequest(endpoint, model, text, sampling, stream, include_usage, names)
