"""Per-request sampling parameters and their validation.

`SamplingParams` is immutable; `validate` is the one place where caller mistakes in a request
become a ValueError that names the field and the offending value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next tokens of one request.

    temperature 0 means greedy; top_k 0 and top_p 1.0 mean "off". `min_tokens` masks EOS
    (unless `ignore_eos`) and `stop_token_ids` until that many tokens were generated.
    `seed` makes sampling reproducible: token i of the request is drawn from a generator
    seeded by (seed, i), whatever else shares the batch. `logprobs` asks for the log
    probability of each chosen token under the model's unmodified distribution (log_softmax
    of the raw logits, before temperature, top-k, top-p and min_tokens masking).

    Logit processing (all off by default): `repetition_penalty` (> 0, 1.0 off) divides the
    positive logits and multiplies the negative ones of every token seen in prompt + output
    (HF/vLLM); `presence_penalty` and `frequency_penalty` (in [-2, 2]) subtract
    `presence * (count > 0) + frequency * count` over the output tokens' counts (OpenAI/vLLM);
    `min_p` (in [0, 1], 0 off) drops tokens whose probability after temperature is below
    `min_p` times the largest one (vLLM); `bad_words_ids` bans the last token of each id
    sequence whose other tokens end the output so far (one-token sequences always).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_tokens: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """True when a repetition, presence or frequency penalty changes the logits."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self, max_model_len: int, prompt_len: int) -> None:
        """Raise ValueError naming the field and value of the first invalid setting.

        `prompt_len` is the number of prompt tokens; the prompt must be non-empty and no
        longer than `max_model_len`.
        """
        if prompt_len <= 0:
            raise ValueError(f"prompt_token_ids must not be empty (got {prompt_len} tokens)")
        if prompt_len > max_model_len:
            raise ValueError(
                f"prompt_token_ids has {prompt_len} tokens, more than max_model_len={max_model_len}"
            )
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}"
            )
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids!r}")
        self._validate_logit_processing()

    def _validate_logit_processing(self) -> None:
        if not self.repetition_penalty > 0.0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}"
            )
        for name, value in (
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ):
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if any(not ids or any(t < 0 for t in ids) for ids in self.bad_words_ids):
            raise ValueError(
                f"bad_words_ids must be non-empty sequences of token ids >= 0, "
                f"got {self.bad_words_ids!r}"
            )
