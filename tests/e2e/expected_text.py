"""The oracle for a finished request's text, shared by the e2e tests that compare the server's
text with the decode of reference tokens (HF ``generate`` or the single-process engine)."""

from __future__ import annotations

REPLACEMENT = "\ufffd"


def finished_text(decoded: str) -> str:
    """What the server sends in all for output tokens whose decode (U+FFFD for bytes that are no
    complete UTF-8 character) is ``decoded``: the same text without its trailing U+FFFD.

    A character that max_tokens cut before its last byte, or bytes the model ended with that form
    no character, are never sent, as in vLLM's incremental detokenizer (the server's side of this
    rule is backends/engine/text_stream.py). A U+FFFD inside the text is kept.
    """
    return decoded.rstrip(REPLACEMENT)
