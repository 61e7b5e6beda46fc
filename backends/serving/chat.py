"""Server-side chat templates: a request's ``text_input`` as a conversation, rendered with the
model's own template (from its tokenizer_config.json or its GGUF metadata).

A ``llm`` request opts in with ``"apply_chat_template": true`` in ``sampling_parameters``.
``text_input`` is then either one user turn (plain text) or, when it parses as a JSON array,
the whole conversation as OpenAI-style messages: ``[{"role": "system" | "user" | "assistant",
"content": "..."}, ...]``. A JSON array that is not such a list is an error, never a user turn
(send ``[{"role": "user", "content": "[1, 2]"}]`` to ask about the text ``[1, 2]``). The
rendered prompt ends with the assistant's generation prompt; it is what the model sees, what
``num_input_tokens`` counts and what ``exclude_input_in_output: false`` echoes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Protocol

from backends.engine.tokenizer import CHAT_ROLES, ChatMessage
from backends.serving.requests import GenerateRequest

FIELD = "text_input"


class ChatTokenizer(Protocol):
    chat_template: str | None

    def apply_chat_template(self, messages: list[ChatMessage], *,
                            add_generation_prompt: bool = True) -> str: ...


def chat_messages(text: str) -> list[ChatMessage]:
    """The conversation in ``text`` (see the module docstring); ValueError names what is wrong."""
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        return [ChatMessage("user", text)]
    if not isinstance(data, list):
        return [ChatMessage("user", text)]
    if not data:
        raise ValueError(f"{FIELD}: the chat messages array is empty")
    messages = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            raise ValueError(f"{FIELD}: chat message {i} must be an object with exactly the keys "
                             f"role and content, got {json.dumps(item, ensure_ascii=False)[:80]}")
        role, content = item["role"], item["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"{FIELD}: chat message {i}: role must be one of "
                             f"{', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{FIELD}: chat message {i}: content must be a string, "
                             f"got {type(content).__name__}")
        messages.append(ChatMessage(role, content))
    return messages


def with_chat_prompt(req: GenerateRequest, tokenizer: ChatTokenizer) -> GenerateRequest:
    """``req`` unchanged unless it asked for the chat template; then with ``prompt`` rendered.
    ValueError when the model has no template or the conversation is malformed."""
    if not req.chat:
        return req
    if tokenizer.chat_template is None:
        raise ValueError("sampling_parameters.apply_chat_template: this model has no chat "
                         "template; send the prompt as plain text")
    prompt = tokenizer.apply_chat_template(chat_messages(req.prompt), add_generation_prompt=True)
    return replace(req, prompt=prompt)
