"""Turns the logits of one step into one token per sequence.

Order of processing per row: min_tokens masking (EOS unless ignore_eos, and stop_token_ids,
while fewer than min_tokens were generated) -> bad_words_ids masking -> repetition, frequency
and presence penalties -> greedy argmax, or temperature -> min-p -> top-k -> top-p -> a draw.
Rows that use none of bad words, penalties and min-p skip those stages entirely. A draw is `argmax(probs / q)` with `q ~ Exp(1)` per vocabulary entry (the
exponential race, equal in law to a categorical draw). For a seeded request the noise of its
token `i` comes from a CPU generator seeded by `(seed, i)` only, so the token does not depend on
the batch, the device or which engine computes it; unseeded requests share the engine's
generator. Logprobs are those of the chosen token under the model's raw distribution
(log_softmax of the unmodified logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from backends.engine.sampling_params import SamplingParams

_MASK64 = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class SampleRow:
    """One row of logits: its request's params and the index of the output token it draws.

    `token_ids` is the request's prompt + output so far (its first `num_prompt_tokens` are the
    prompt); only penalties and bad words read it.
    """

    params: SamplingParams
    output_index: int
    token_ids: Sequence[int] = ()
    num_prompt_tokens: int = 0

    @property
    def output_ids(self) -> Sequence[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # None unless some row asked for logprobs


def token_seed(seed: int, index: int) -> int:
    """The generator seed for output token `index` of a request seeded with `seed`."""
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    return mixed ^ (mixed >> 31)


class Sampler:
    """Stateless apart from the generator used by unseeded rows."""

    def __init__(self, eos_token_ids: tuple[int, ...], seed: int = 0) -> None:
        self.eos_token_ids = eos_token_ids
        self._generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        """`logits` `[len(rows), vocab]` float32 (modified in place); one token per row."""
        if logits.shape[0] != len(rows):
            raise RuntimeError(f"{logits.shape[0]} logit rows for {len(rows)} sample rows")
        logprobs = None
        if any(r.params.logprobs for r in rows):
            logprobs = torch.log_softmax(logits, dim=-1)
        self._mask_min_tokens(logits, rows)
        if any(r.params.bad_words_ids for r in rows):
            _mask_bad_words(logits, rows)
        penalized = [i for i, r in enumerate(rows) if r.params.penalized]
        if penalized:
            _apply_penalties(logits, rows, penalized)
        greedy = [r.params.greedy for r in rows]
        tokens = logits.argmax(dim=-1)
        if not all(greedy):
            sampled = [i for i, g in enumerate(greedy) if not g]
            index = torch.tensor(sampled, device=logits.device)
            drawn = self._draw(logits.index_select(0, index), [rows[i] for i in sampled])
            tokens.index_copy_(0, index, drawn)
        chosen_logprobs = None
        if logprobs is not None:
            chosen_logprobs = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        return SamplerOutput(tokens.tolist(), chosen_logprobs)

    def _mask_min_tokens(self, logits: torch.Tensor, rows: list[SampleRow]) -> None:
        for i, row in enumerate(rows):
            p = row.params
            if row.output_index >= p.min_tokens:
                continue
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
            if banned:
                logits[i, banned] = float("-inf")

    def _draw(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Sample one token per row of `logits` (rows all non-greedy)."""
        device = logits.device
        temps = torch.tensor([r.params.temperature for r in rows], device=device)
        x = logits / temps[:, None]
        min_p = [r.params.min_p for r in rows]
        if any(m > 0.0 for m in min_p):
            x = _min_p(x, min_p)
        top_k = [r.params.top_k for r in rows]
        top_p = [r.params.top_p for r in rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            x = _top_k_top_p(x, top_k, top_p)
        probs = torch.softmax(x, dim=-1)
        noise = self._noise(rows, x.shape[1]).to(device)
        return (probs / noise).argmax(dim=-1)

    def _noise(self, rows: list[SampleRow], vocab: int) -> torch.Tensor:
        noise = torch.empty(len(rows), vocab)
        for i, row in enumerate(rows):
            seed = row.params.seed
            if seed is None:
                noise[i].exponential_(generator=self._generator)
            else:
                gen = torch.Generator().manual_seed(token_seed(seed, row.output_index))
                noise[i].exponential_(generator=gen)
        return noise


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k and top-p (nucleus) set."""
    vocab = x.shape[1]
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=x.device)
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k], device=x.device)
    remove = ranks[None, :] >= k[:, None]
    sorted_x = sorted_x.masked_fill(remove, float("-inf"))
    probs = torch.softmax(sorted_x, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.tensor(top_p, device=x.device, dtype=probs.dtype)
    remove |= mass_before >= p[:, None]
    remove[:, 0] = False
    mask = torch.zeros_like(remove).scatter_(1, order, remove)
    return x.masked_fill(mask, float("-inf"))


def _mask_bad_words(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """-inf for each bad word's last token when its other tokens end the row's output."""
    row_index: list[int] = []
    token_index: list[int] = []
    for i, row in enumerate(rows):
        words = row.params.bad_words_ids
        if not words:
            continue
        output = row.output_ids
        for word in words:
            prefix = len(word) - 1
            if prefix == 0 or (
                prefix <= len(output) and tuple(output[len(output) - prefix :]) == word[:-1]
            ):
                row_index.append(i)
                token_index.append(word[-1])
    if row_index:
        logits[row_index, token_index] = float("-inf")


def _padded(ids: list[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """`[len(ids), max_len]` int64 of the id lists, padded with `pad` (at least one column)."""
    width = max(1, max(len(x) for x in ids))
    out = torch.full((len(ids), width), pad, dtype=torch.int64)
    for i, x in enumerate(ids):
        if x:
            out[i, : len(x)] = torch.tensor(x, dtype=torch.int64)
    return out.to(device)


def _apply_penalties(logits: torch.Tensor, rows: list[SampleRow], index: list[int]) -> None:
    """Repetition (prompt + output), then frequency and presence (output) penalties, in place.

    `index` lists the rows that use a penalty; padding lands in an extra vocabulary column.
    """
    device = logits.device
    n, vocab = len(index), logits.shape[1]
    picked = [rows[i] for i in index]
    at = torch.tensor(index, device=device)
    x = logits.index_select(0, at)
    counts = torch.zeros(n, vocab + 1, dtype=x.dtype, device=device)
    out_ids = _padded([r.output_ids for r in picked], vocab, device)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=x.dtype))
    counts = counts[:, :vocab]
    rep = torch.tensor([r.params.repetition_penalty for r in picked], device=device)[:, None]
    if bool((rep != 1.0).any()):
        seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, _padded([r.token_ids for r in picked], vocab, device), True)
        penalized = torch.where(x < 0, x * rep, x / rep)
        x = torch.where(seen[:, :vocab], penalized, x)
    freq = torch.tensor([r.params.frequency_penalty for r in picked], device=device)[:, None]
    pres = torch.tensor([r.params.presence_penalty for r in picked], device=device)[:, None]
    x = x - freq * counts - pres * (counts > 0).to(x.dtype)
    logits.index_copy_(0, at, x)


def _min_p(x: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Set to -inf every logit whose probability is below min_p times the row's largest."""
    probs = torch.softmax(x, dim=-1)
    threshold = torch.tensor(min_p, device=x.device, dtype=probs.dtype)[:, None]
    return x.masked_fill(probs < threshold * probs.max(dim=-1, keepdim=True).values, float("-inf"))
