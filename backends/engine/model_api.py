"""The seam between the engine (scheduler, runner) and the models: see docs/contracts.md.

The runner builds one `AttentionMetadata` per step and calls `CausalLM.forward` with the
flattened new tokens of every scheduled sequence. The model writes the new tokens' KV into
`kv_caches` at `slot_mapping` and attends over each sequence's blocks; it never allocates or
frees blocks (the block manager owns them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from backends.engine.config import ModelConfig
from backends.engine.decode_workspace import WorkspaceStep

__all__ = ["AttentionMetadata", "CausalLM", "ModelConfig"]


@dataclass(slots=True)
class AttentionMetadata:
    """Where one step's tokens live in the paged KV cache.

    slot_mapping: [T] int64, cache slot (block_id * block_size + offset) of each new token.
    query_start_loc: B+1 cumulative query lengths over the flattened step.
    context_lens: [B] int64, tokens of each sequence after this step (cached + new);
    context_lens_list: the same on the host when the runner has it (spares a device sync).
    block_tables: [B, max_num_blocks] int32, rows padded with 0 (masked by context_lens).
    max_context_len: max(context_lens).
    decode_only: every sequence has exactly one new token.
    workspace: on decode-only steps of a model that exposes `decode_workspace_layout`, where
    each sequence's KV sits in the decode workspace (see decode_workspace.py); the model must
    then append the new tokens there and attend over it. None: attend over the paged cache.
    """

    slot_mapping: torch.Tensor
    query_start_loc: list[int]
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_context_len: int
    decode_only: bool
    workspace: WorkspaceStep | None = None
    context_lens_list: list[int] | None = None


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only model over a paged KV cache (an nn.Module).

    KV cache: one tensor per layer, `[num_blocks, block_size, kv_width]`, the model's dtype.
    """

    config: ModelConfig
    num_layers: int
    kv_width: int

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """Hidden states `[T, hidden]` of the new tokens; writes their KV into kv_caches."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[N, vocab]` in float32 for the given hidden states."""
        ...
