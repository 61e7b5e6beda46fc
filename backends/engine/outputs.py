"""What the engine hands back: per-step request outputs, the KV layout and KV exports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One step's news about one request.

    `new_token_ids` / `new_logprobs` are the tokens sampled this step (never retracted;
    `new_logprobs` is empty unless the request asked for logprobs). `text` is the whole
    decoded output so far with stop strings cut; while unfinished it holds back the last
    `max(len(stop)) - 1` characters, so a streamed text only ever grows. Output counts include
    `prior_output_ids` of an imported request. A prefill-only request ends with
    `finished=True` and `finish_reason=None` (hand off to decode) unless its first token
    already ended it.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[float, ...]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The whole result of one request, as `LLMEngine.generate` returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: FinishReason | None


@dataclass(frozen=True, slots=True)
class KVLayout:
    """How one engine's paged KV cache is laid out.

    Per layer one tensor `[num_blocks, block_size, kv_width]` of `dtype` (a torch dtype name
    such as "float32"); for each token `kv_width` elements (Llama: K heads x dim then V;
    MLA: the compressed latent then the rope key).
    """

    dtype: str
    num_layers: int
    block_size: int
    kv_width: int
    bytes_per_token_per_layer: int


@dataclass(frozen=True, slots=True)
class KVExport:
    """The KV of a finished prefill-only request, block by block and layer by layer.

    Holds the first `num_tokens` tokens (the prompt) in `block_ids` (the last block may be
    partly filled). `layer(i)` returns a copy `[len(block_ids), block_size, kv_width]` of layer
    i; the blocks stay valid until `LLMEngine.release_kv(request_id)`.
    """

    request_id: str
    num_tokens: int
    layout: KVLayout
    block_ids: tuple[int, ...]
    read_layer: Callable[[int], torch.Tensor]

    def layer(self, index: int) -> torch.Tensor:
        """A copy of layer `index` of the exported blocks."""
        if not 0 <= index < self.layout.num_layers:
            raise ValueError(f"layer must be in [0, {self.layout.num_layers}), got {index}")
        return self.read_layer(index)
