"""After a token is sampled: the stop conditions, and the request's text.

Stop token ids and EOS end a request with 'stop' and are kept in the output ids but not in
the text. A stop string ends it with 'stop' too: the text ends right before the stop string
and the output ids end with the token that completed it (no token after it is generated).

Text and stop strings are the detokenizer's (text_stream.TextStream, the same class the
orchestrator makes the client's text with), seeded with the prompt's tail, so the engine stops
exactly where the orchestrator cuts the text, also with tokenizers that mark a word boundary
on the following token (sentencepiece "▁": the first output word keeps its space). A character
still incomplete when the request ends (max_tokens, EOS or a prefill-only hand-off cut it) is
dropped, never reported as U+FFFD, as vLLM does (so is a U+FFFD the model itself ends with);
before this class was shared the engine kept it as U+FFFD when the request had no stop strings.
"""

from __future__ import annotations

from backends.engine.outputs import FinishReason
from backends.engine.sequence import Sequence
from backends.engine.text_stream import CONTEXT_TOKENS, Decoder, TextStream


class StopChecker:
    """Decides whether a sequence is finished after its newest token, and makes its text."""

    def __init__(self, tokenizer: Decoder, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def new_text(self, seq: Sequence) -> TextStream:
        """The text of a new sequence, seeded with its prompt's tail and fed its prior output
        ids (a stop string in them ends the sequence at its first check)."""
        num_prompt = seq.num_prompt_tokens
        text = TextStream(self.tokenizer, seq.params.stop,
                          seq.token_ids[max(0, num_prompt - CONTEXT_TOKENS):num_prompt])
        if seq.num_output_tokens:
            text.feed(seq.output_token_ids)
        return text

    def check(self, seq: Sequence, text: TextStream) -> FinishReason | None:
        """Why the sequence ends after its newest token, if it does. With stop strings the
        token is fed to `text` now (the decision needs it); otherwise `visible_text` feeds it."""
        params = seq.params
        token = seq.token_ids[-1]
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            return "stop"
        if params.stop:
            text.feed((token,))
            if text.stopped:
                return "stop"
        if seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def visible_text(seq: Sequence, text: TextStream, new_ids: tuple[int, ...],
                     reason: FinishReason | None, finished: bool) -> str:
        """The text to report after `new_ids` (the token(s) `check` saw): complete, or while
        unfinished holding back what may start a stop string. Without stop strings `new_ids`
        are fed here (async_output calls this one step later), except a token that ended the
        request with 'stop' (EOS / a stop token id: not text)."""
        if not seq.params.stop and reason != "stop":
            text.feed(new_ids)
        if finished:
            text.finish()
        return text.text
