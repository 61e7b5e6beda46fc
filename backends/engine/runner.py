"""ModelRunner: owns the paged KV cache tensors and runs one scheduled step through the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from backends.engine.decode_graphs import DecodeGraphs
from backends.engine.decode_workspace import DecodeWorkspace, WorkspaceStep
from backends.engine.model_api import AttentionMetadata
from backends.engine.models.layers import input_major_linear_weights
from backends.engine.scheduler import ScheduledSeq
from backends.engine.workspace_slots import WorkspaceSlots

# The workspace may use as much memory as the KV pool, and at least this much (tiny pools).
WORKSPACE_MIN_BUDGET_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # rows of the flattened step whose logits are sampled
    sample_all: bool = False  # every row samples, in order (sample_indices == arange)


class ModelRunner:
    """Runs `model` (a model_api.CausalLM) over `num_blocks` blocks of `block_size` tokens.

    The cache is one zeroed tensor `[num_blocks, block_size, kv_width]` per layer on `device`;
    the runner never frees or reuses blocks itself (the block manager decides). With
    `max_num_seqs` and `max_model_len` given, a model exposing `decode_workspace_layout` and a
    CPU device, decode-only steps run over a decode workspace (at most the pool's size, or
    `WORKSPACE_MIN_BUDGET_BYTES` for tiny pools).
    On CPU the runner also re-lays the model's linear weights input-major (same values; see
    `models.layers.input_major_linear_weights`).
    With `graph_mode` ("capture" or "static", see decode_graphs.py), decode-only steps of up to
    `graph_max_batch` sequences run over static padded buffers (captured as CUDA graphs in
    "capture"); each cache then has one extra scratch block (id `num_blocks`) for padding rows,
    which `kv_caches` (the pool the rest of the engine sees) does not show.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        graph_mode: str | None = None,
        graph_max_batch: int | None = None,
    ) -> None:
        self.model = model
        if device.type == "cpu":
            input_major_linear_weights(model)
        self.block_size = block_size
        self.device = device
        num_layers: int = model.num_layers  # type: ignore[assignment]
        kv_width: int = model.kv_width  # type: ignore[assignment]
        extra = 1 if graph_mode is not None else 0  # the graphs' scratch block
        # what the model reads and writes; `kv_caches` hides the scratch block
        self.model_caches = [
            torch.zeros(num_blocks + extra, block_size, kv_width, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.kv_caches = [c[:num_blocks] for c in self.model_caches] if extra else self.model_caches
        self.workspace: WorkspaceSlots | None = None
        layout_fn = getattr(model, "decode_workspace_layout", None)
        layout = layout_fn(self.kv_caches[0]) if layout_fn is not None else None
        # CPU only: there the per-step block gather dominates decode; on GPUs it is cheap and
        # memory is better spent on the pool.
        if (layout is not None and max_num_seqs is not None and max_model_len is not None
                and device.type == "cpu"):
            buffers = DecodeWorkspace(num_layers, layout, max_num_seqs, dtype, device)
            pool_bytes = sum(c.numel() * c.element_size() for c in self.kv_caches)
            self.workspace = WorkspaceSlots(
                buffers, block_size=block_size, max_len=max_model_len,
                max_bytes=max(pool_bytes, WORKSPACE_MIN_BUDGET_BYTES))
        self.graphs: DecodeGraphs | None = None
        if graph_mode is not None:
            if max_model_len is None or graph_max_batch is None:
                raise ValueError("graph_mode needs max_model_len and graph_max_batch")
            self.graphs = DecodeGraphs(
                self._forward_logits, mode=graph_mode, max_batch=graph_max_batch,
                block_size=block_size, max_model_len=max_model_len, scratch_block=num_blocks,
                device=device)
            self.graphs.capture()

    def _forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor,
                        meta: AttentionMetadata) -> torch.Tensor:
        """Logits of every row of a decode step (what a decode graph computes)."""
        hidden = self.model(input_ids, positions, meta, self.model_caches)
        logits: torch.Tensor = self.model.compute_logits(hidden)  # type: ignore[operator]
        return logits

    def prepare(self, batch: list[ScheduledSeq]) -> StepInputs:
        """Flatten the step's new tokens and describe where their KV lives."""
        if all(item.num_new_tokens == 1 for item in batch):
            return self._prepare_decode(batch)
        bs = self.block_size
        query_start_loc = [0]
        context_lens: list[int] = []
        tokens: list[int] = []
        positions: list[np.ndarray] = []
        for item in batch:
            start = item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            tokens.extend(item.seq.token_ids[start:end])
            positions.append(np.arange(start, end, dtype=np.int64))
            query_start_loc.append(query_start_loc[-1] + item.num_new_tokens)
            context_lens.append(end)
        max_blocks = max(-(-c // bs) for c in context_lens)
        tables = np.zeros((len(batch), max_blocks), dtype=np.int32)
        slot_parts = []
        for i, item in enumerate(batch):
            row = np.asarray(item.seq.block_table[: -(-context_lens[i] // bs)], dtype=np.int64)
            tables[i, : len(row)] = row
            pos = positions[i]
            slot_parts.append(row[pos // bs] * bs + pos % bs)
        sample = [query_start_loc[i + 1] - 1 for i, item in enumerate(batch) if item.samples]
        inputs = self._inputs(
            tokens,
            np.concatenate(positions),
            np.concatenate(slot_parts),
            query_start_loc,
            context_lens,
            tables,
            sample,
        )
        single = [i for i, item in enumerate(batch) if item.num_new_tokens == 1]
        if self.workspace is not None and single:
            inputs.meta.workspace = self._mixed_workspace(batch, single, query_start_loc)
        return inputs

    def _mixed_workspace(self, batch: list[ScheduledSeq], single: list[int],
                         query_start_loc: list[int]) -> WorkspaceStep | None:
        """In a mixed step, the one-token sequences (decodes) attend over the workspace."""
        if self.workspace is None:
            return None
        seqs = [batch[i].seq for i in single]
        positions = [seq.num_computed_tokens for seq in seqs]
        index = torch.tensor([[query_start_loc[i] for i in single], positions],
                             dtype=torch.int64).to(self.device)
        return self.workspace.plan(seqs, positions, index[1], token_index=index[0],
                                   seq_indices=tuple(single))

    def _prepare_decode(self, batch: list[ScheduledSeq]) -> StepInputs:
        """One new token per sequence: plain Python over B items, one tensor conversion;
        block tables only when the step reads the paged cache."""
        bs = self.block_size
        seqs = [item.seq for item in batch]
        positions = [seq.num_computed_tokens for seq in seqs]
        tokens = [seq.token_ids[pos] for seq, pos in zip(seqs, positions, strict=True)]
        slots = [seq.block_table[pos // bs] * bs + pos % bs
                 for seq, pos in zip(seqs, positions, strict=True)]
        packed = torch.tensor((tokens, positions, slots), dtype=torch.int64).to(self.device)
        workspace = None
        if self.workspace is not None:
            workspace = self.workspace.plan(seqs, positions, packed[1])
        max_context_len = max(positions) + 1
        num_blocks = 0 if workspace is not None else -(-max_context_len // bs)
        tables = np.zeros((len(batch), num_blocks), dtype=np.int32)
        for i, seq in enumerate(seqs if num_blocks else ()):
            row = seq.block_table[:num_blocks]
            tables[i, : len(row)] = row
        meta = AttentionMetadata(
            slot_mapping=packed[2],
            query_start_loc=list(range(len(batch) + 1)),
            context_lens=packed[1] + 1,
            block_tables=torch.from_numpy(tables).to(self.device),
            max_context_len=max_context_len,
            decode_only=True,
            workspace=workspace,
        )
        sample = _sample_rows(batch)
        if sample is None:
            rows = torch.arange(len(batch), device=self.device)
            return StepInputs(packed[0], packed[1], meta, rows, sample_all=True)
        # a one-token prefill chunk that does not end its prompt samples nothing
        rows = torch.tensor(sample, dtype=torch.int64, device=self.device)
        return StepInputs(packed[0], packed[1], meta, rows)

    def _inputs(
        self,
        tokens: list[int],
        positions: np.ndarray,
        slots: np.ndarray,
        query_start_loc: list[int],
        context_lens: list[int],
        tables: np.ndarray,
        sample: list[int],
    ) -> StepInputs:
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc=query_start_loc,
            context_lens=torch.tensor(context_lens, dtype=torch.int64, device=dev),
            block_tables=torch.from_numpy(tables).to(dev),
            max_context_len=max(context_lens),
            decode_only=len(tokens) == len(context_lens),
            context_lens_list=context_lens,
        )
        return StepInputs(
            input_ids=torch.tensor(tokens, dtype=torch.int64, device=dev),
            positions=torch.from_numpy(positions).to(dev),
            meta=meta,
            sample_indices=torch.tensor(sample, dtype=torch.int64, device=dev),
        )

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Run the step; logits `[N, vocab]` float32 for the sequences that sample, in order."""
        graphs = self.graphs
        if (graphs is not None and len(batch) <= graphs.max_batch
                and all(item.num_new_tokens == 1 for item in batch)):
            every_row = graphs.run([item.seq for item in batch])
            sample = _sample_rows(batch)
            if sample is None:
                return every_row
            return every_row.index_select(
                0, torch.tensor(sample, dtype=torch.int64, device=self.device))
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.model_caches)
        if inputs.meta.workspace is not None and self.workspace is not None:
            self.workspace.commit()
        if inputs.sample_indices.numel() == 0:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        if not inputs.sample_all:
            hidden = hidden.index_select(0, inputs.sample_indices)
        logits: torch.Tensor = self.model.compute_logits(hidden)  # type: ignore[operator]
        return logits


def _sample_rows(batch: list[ScheduledSeq]) -> list[int] | None:
    """Indices of the items that sample, or None when every item does."""
    if all(item.samples for item in batch):
        return None
    return [i for i, item in enumerate(batch) if item.samples]
