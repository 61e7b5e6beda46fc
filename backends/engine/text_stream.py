"""The detokenizer: UTF-8-safe incremental detokenization with stop strings.

This is the one place text is made from token ids: the engine feeds it to decide on stop
strings (and to fill RequestOutput.text when it detokenizes), the orchestrator feeds it the
token ids its workers return to make the client's text. Both seed it with the prompt's tail
(``context_ids``), so a worker's stop decision and the orchestrator's text cut agree.

``TextStream.feed(ids)`` returns only text that can no longer change: characters still being
assembled from multi-byte tokens (a trailing U+FFFD) and the last ``max(len(stop)) - 1``
characters (which may start a stop string) are held back until more tokens or ``finish()``.
A character still incomplete at ``finish()`` (max_tokens cut it) is dropped, never sent as
U+FFFD, as vLLM's incremental detokenizer does (so is a U+FFFD the model itself ends with).
Decoding always covers a window that starts a few tokens back, so tokenizers that mark word
boundaries on the following token (sentencepiece "▁") keep their spaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextDelta(NamedTuple):  # a NamedTuple: built for every token, cheaper than a dataclass
    """New output text; ``stopped`` is True when a stop string ended the text (cut before it)."""

    text: str
    stopped: bool


class TextStream:
    """Turns a growing list of output token ids into append-only text deltas.

    ``context_ids`` (typically the prompt's tail) only seed the decoding window; their text is
    never emitted. After ``stopped`` or ``finish()`` further feeds return empty deltas. Not
    thread-safe: one owner feeds it.
    """

    def __init__(self, decoder: Decoder, stop: Sequence[str] = (),
                 context_ids: Sequence[int] = ()) -> None:
        self._decoder = decoder
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids = list(context_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""      # decoded output text (complete characters only)
        self._emitted = 0    # characters of _text already returned
        self._done = False
        self._stopped = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text[: self._emitted]

    @property
    def stopped(self) -> bool:
        """True once a stop string ended the text (the delta that found it said so too)."""
        return self._stopped

    def feed(self, ids: Sequence[int]) -> TextDelta:
        if self._done:
            return TextDelta("", False)
        self._ids.extend(ids)
        self._decode_ready(final=False)
        return self._release(final=False)

    def finish(self) -> TextDelta:
        """Flush everything held back except an incomplete last character."""
        if self._done:
            return TextDelta("", False)
        self._decode_ready(final=True)
        delta = self._release(final=True)
        self._done = True
        return delta

    def _decode_ready(self, final: bool) -> None:
        prefix = self._decoder.decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decoder.decode(self._ids[self._prefix_offset:])
        if final:
            full = full.rstrip(REPLACEMENT)
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return
        self._text += full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)

    def _release(self, final: bool) -> TextDelta:
        cut = self._find_stop()
        if cut is not None:
            self._text = self._text[:cut]
            self._done = self._stopped = True
            final = True
        end = len(self._text) if final else max(self._emitted, len(self._text) - self._hold)
        delta = self._text[self._emitted:end]
        self._emitted = end
        return TextDelta(delta, cut is not None)

    def _find_stop(self) -> int | None:
        if not self._stop:
            return None
        text, start = self._text, max(0, self._emitted - self._hold)
        cut = None
        for stop in self._stop:
            found = text.find(stop, start)
            if found >= 0 and (cut is None or found < cut):
                cut = found
        return cut
