"""Response bodies and server-sent-event chunks in OpenAI's shapes.

Streams follow OpenAI's order: for chat, a first chunk whose delta carries ``role`` (and empty
content), then one chunk per text delta, then a chunk with an empty delta and the
``finish_reason``; with ``stream_options.include_usage``, every chunk carries ``"usage": null``
and one last chunk has ``choices: []`` and the usage; then ``data: [DONE]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from backends.openai_api.protocol import Endpoint

DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True, slots=True)
class Shaper:
    """The bodies of one request: its id, creation time and model are the same in each."""

    endpoint: Endpoint
    request_id: str
    created: int
    model: str
    include_usage: bool = False

    def _head(self, streamed: bool) -> dict[str, Any]:
        if self.endpoint == "chat":
            kind = "chat.completion.chunk" if streamed else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int,
              completion_tokens: int) -> dict[str, Any]:
        """The non-streamed response."""
        if self.endpoint == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        return self._head(False) | {"choices": [choice],
                                    "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None,
              role: bool = False) -> dict[str, Any]:
        """One streamed chunk: a text delta (None: no content key), a finish, or chat's first
        chunk (``role``)."""
        if self.endpoint == "chat":
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        out = self._head(True) | {"choices": [choice]}
        return out | {"usage": None} if self.include_usage else out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self._head(True) | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}
