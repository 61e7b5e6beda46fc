"""Engine-internal state of one request."""

from __future__ import annotations

import enum
from collections.abc import Sequence as Seq

from backends.engine.block_manager import BlockId
from backends.engine.hooks import KVSource
from backends.engine.outputs import FinishReason
from backends.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # blocks allocated, an import worker writing its KV
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request's tokens, progress and blocks; mutated only by the scheduler and engine.

    `token_ids` is prompt + output; the first `num_computed_tokens` have KV in `block_table`.
    A sequence samples a token whenever a step computes its last token.
    """

    __slots__ = (
        "request_id", "params", "token_ids", "num_prompt_tokens", "num_computed_tokens",
        "block_table", "status", "prefill_only", "kv_source", "logprobs", "finish_reason",
        "num_cached_tokens", "num_published_blocks", "num_prior_outputs", "text",
        "arrival_index", "kv_epoch",
    )  # fmt: skip

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        *,
        arrival_index: int,
        prefill_only: bool = False,
        kv_source: KVSource | None = None,
        prior_output_ids: Seq[int] = (),
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.token_ids: list[int] = [*prompt_token_ids, *prior_output_ids]
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_prior_outputs = len(prior_output_ids)
        self.num_computed_tokens = 0
        self.block_table: list[BlockId] = []
        self.status = SeqStatus.WAITING
        self.prefill_only = prefill_only
        self.kv_source = kv_source
        self.logprobs: list[float] = []
        self.finish_reason: FinishReason | None = None
        self.num_cached_tokens = 0
        self.num_published_blocks = 0
        self.text = ""
        self.arrival_index = arrival_index
        # Bumped whenever this sequence's KV changes other than by the model computing its
        # next tokens (recompute, import, prefix load): KV copies of older epochs are stale.
        self.kv_epoch = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Forget all KV (blocks must already be freed): recompute prompt + outputs."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_published_blocks = 0
        self.kv_source = None
        self.kv_epoch += 1
        self.status = SeqStatus.WAITING
