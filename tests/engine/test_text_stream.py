"""TextStream: UTF-8-safe, append-only deltas and stop strings, with the presets' byte tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.engine.text_stream import TextStream
from backends.engine.tokenizer import byte_level_tokenizer

TOK = byte_level_tokenizer()


def feed_one_by_one(stream: TextStream, ids: list[int]) -> list[str]:
    deltas = [stream.feed([i]).text for i in ids]
    deltas.append(stream.finish().text)
    return deltas


def test_multibyte_characters_are_held_until_complete() -> None:
    ids = TOK.encode("né€😀")
    stream = TextStream(TOK)
    deltas = feed_one_by_one(stream, ids)
    assert deltas == ["n", "", "é", "", "", "€", "", "", "", "😀", ""]
    assert stream.text == "né€😀"


def test_prompt_context_is_never_emitted() -> None:
    stream = TextStream(TOK, context_ids=TOK.encode("Hello"))
    assert stream.feed(TOK.encode(" world")).text == " world"


def test_stop_string_cuts_text_and_holds_back_possible_prefix() -> None:
    stream = TextStream(TOK, stop=("END",))
    assert [stream.feed(TOK.encode(c)).text for c in "abcEN"] == ["", "", "a", "b", "c"]
    delta = stream.feed(TOK.encode("D"))
    assert (delta.text, delta.stopped) == ("", True)
    assert stream.feed(TOK.encode("more")).text == ""
    assert stream.text == "abc"


def test_held_back_text_is_flushed_by_finish() -> None:
    stream = TextStream(TOK, stop=("xyz",))
    assert stream.feed(TOK.encode("abxy")).text == "ab"
    delta = stream.finish()
    assert (delta.text, delta.stopped) == ("xy", False)


@pytest.mark.parametrize("cut", [1, 2])
def test_a_character_cut_by_max_tokens_is_dropped_not_replaced(cut: int) -> None:
    stream = TextStream(TOK)
    ids = TOK.encode("a€")  # € is 3 bytes: cut after 1 or 2 of them
    assert [stream.feed([i]).text for i in ids[:1 + cut]] == ["a"] + [""] * cut
    assert stream.finish().text == ""
    assert stream.text == "a"


def test_an_invalid_byte_inside_the_text_still_comes_out() -> None:
    stream = TextStream(TOK)
    ids = TOK.encode("a€b")
    del ids[2]  # the € lacks its middle byte: invalid, not incomplete, once "b" follows
    assert "".join(feed_one_by_one(stream, ids)) == TOK.decode(ids)
    assert stream.text.startswith("a") and stream.text.endswith("b")


# A U+FFFD the model ends with is dropped like an incomplete character (as in vLLM). No lone
# surrogates: they are not text a client can send (UTF-8 cannot carry them).
TEXT = st.text(st.characters(blacklist_characters="\ufffd", blacklist_categories=("Cs",)), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(TEXT, st.integers(min_value=1, max_value=5))
def test_deltas_concatenate_to_full_decode(text: str, chunk: int) -> None:
    ids = TOK.encode(text)
    stream = TextStream(TOK)
    out = [stream.feed(ids[i:i + chunk]).text for i in range(0, len(ids), chunk)]
    out.append(stream.finish().text)
    assert "".join(out) == TOK.decode(ids)


@pytest.mark.parametrize("stop", [("o w",), ("zzz", "lo")])
def test_stop_anywhere_in_stream(stop: tuple[str, ...]) -> None:
    stream = TextStream(TOK, stop=stop)
    out = "".join(feed_one_by_one(stream, TOK.encode("hello world")))
    assert out == "hello world"[: min(i for i in ("hello world".find(s) for s in stop) if i >= 0)]
