"""After a token is sampled: incremental detokenization and the stop conditions.

Stop token ids and EOS end a request with 'stop' and are kept in the output ids but not in
the text. A stop string ends it with 'stop' too: the text ends right before the stop string
and the output ids end with the token that completed it (no token after it is generated).
"""

from __future__ import annotations

from typing import Protocol

from backends.engine.outputs import FinishReason
from backends.engine.sequence import Sequence


class Detokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextState:
    """Incremental detokenization state of one sequence (vLLM-style prefix/read offsets)."""

    __slots__ = ("prefix_offset", "read_offset", "text")

    def __init__(self) -> None:
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def append(self, tokenizer: Detokenizer, output_ids: list[int]) -> None:
        """Extend `text` by the complete characters of `output_ids[read_offset:]`."""
        prefix = tokenizer.decode(output_ids[self.prefix_offset : self.read_offset])
        full = tokenizer.decode(output_ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(output_ids)


class StopChecker:
    """Decides whether a sequence is finished after its newest token."""

    def __init__(self, tokenizer: Detokenizer, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def check(self, seq: Sequence, state: TextState) -> FinishReason | None:
        """Update `state.text` for the new token and return why the sequence ends, if it does."""
        params = seq.params
        token = seq.token_ids[-1]
        num_out = seq.num_output_tokens
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            return "stop"
        if params.stop:
            old_len = len(state.text)
            state.append(self.tokenizer, seq.output_token_ids)
            if self._cut_stop_string(state, old_len, params.stop):
                return "stop"
        if num_out >= params.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _cut_stop_string(state: TextState, old_len: int, stops: tuple[str, ...]) -> bool:
        text = state.text
        cut = -1
        for stop in stops:
            found = text.find(stop, max(0, old_len - len(stop) + 1))
            if found >= 0 and (cut < 0 or found < cut):
                cut = found
        if cut < 0:
            return False
        state.text = text[:cut]
        return True

    def visible_text(self, seq: Sequence, state: TextState, finished: bool) -> str:
        """The text to report: complete, or holding back what may start a stop string."""
        if not seq.params.stop:
            if finished:  # flush bytes still waiting for the rest of their character
                state.text = self.tokenizer.decode(self._text_ids(seq, finished))
            else:
                state.append(self.tokenizer, seq.output_token_ids)
            return state.text
        if finished:
            return state.text
        hold = max(len(s) for s in seq.params.stop) - 1
        return state.text[: len(state.text) - hold] if hold else state.text

    def _text_ids(self, seq: Sequence, finished: bool) -> list[int]:
        ids = seq.output_token_ids
        if finished and ids and seq.finish_reason == "stop":
            return ids[:-1]  # the EOS / stop token id that ended it is not text
        return ids
