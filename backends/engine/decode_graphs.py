"""Decode steps over static, padded buffers; on CUDA each batch-size bucket replays a CUDA graph.

A decode-only step (one new token per sequence) has the same shapes every time once its batch
is padded to a bucket size and its block tables to a fixed width, so the whole forward plus the
logits can be captured once per bucket and replayed: one graph launch instead of hundreds of
kernel launches and their Python. The step's inputs are copied (non-blocking, from pinned host
staging) into static device buffers that the graphs read:

- input_ids, positions, slot_mapping, context_lens `[max_batch]` int64, block_tables
  `[max_batch, width]` int32, width = ceil(max_model_len / block_size); the forward sees
  `max_context_len = width * block_size`, so every bucket's plan has the same shape.
- Padding rows (batch .. bucket) decode token 0 at position 0 with context length 1 into the
  *scratch block*: one extra block past the pool that the block manager never hands out, so a
  padding row never writes or reads a real sequence's KV.

Modes: "capture" (CUDA graphs; needs CUDA) and "static" (the same padded forward run eagerly on
any device: the exact twin of a replay, which CPU tests use to check padding and buffers).
Invariants the captured forward relies on: the KV cache tensors and the model's weights never
move; the rotary table is built for `width * block_size` positions before capture (eager steps
never need more, as max_model_len <= width * block_size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from backends.engine.block_manager import BlockId
from backends.engine.model_api import AttentionMetadata
from backends.engine.sequence import Sequence as Seq
from backends.engine.triton_decode import graph_kernels

GRAPH_MODES = ("capture", "static")


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch (max_batch itself included)."""
    if max_batch <= 0:
        raise ValueError(f"max_batch must be > 0, got {max_batch}")
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += range(8, max_batch, 8)
    return (*sizes, max_batch)


class DecodeGraphs:
    """Static decode buffers for batches of up to `max_batch` sequences, and (mode "capture")
    one CUDA graph per bucket.

    `forward(input_ids, positions, meta) -> logits [n, vocab]` is the model step (the runner
    binds the caches); `scratch_block` is the id of the pool's extra block.
    """

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata],
                                         torch.Tensor],
                 *, mode: str, max_batch: int, block_size: int, max_model_len: int,
                 scratch_block: int, device: torch.device) -> None:
        if mode not in GRAPH_MODES:
            raise ValueError(f"mode must be one of {GRAPH_MODES}, got {mode!r}")
        if mode == "capture" and device.type != "cuda":
            raise ValueError(f"mode 'capture' needs a CUDA device, got {device}")
        self.forward = forward
        self.mode = mode
        self.block_size = block_size
        self.width = -(-max_model_len // block_size)
        self.scratch_block = scratch_block
        self.device = device
        self.buckets = bucket_sizes(max_batch)
        self.max_batch = max_batch
        pin = device.type == "cuda"
        # rows: input_ids, positions, slot_mapping, context_lens
        self._host = torch.zeros(4, max_batch, dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros(max_batch, self.width, dtype=torch.int32, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._host_tables_np = self._host_tables.numpy()
        # per staging row: the block-table list it mirrors and how many entries it holds
        self._row_tables: list[list[BlockId] | None] = [None] * max_batch
        self._row_blocks = [0] * max_batch
        self._fill_padding(0, max_batch)
        self._inputs = self._host.to(device)
        self._tables = self._host_tables.to(device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0  # steps run through this object (metrics, tests)
        # the staging copies of the last step (the host rows are rewritten only once it is done)
        self._copied = torch.cuda.Event() if pin else None

    def _fill_padding(self, start: int, end: int) -> None:
        for i in range(start, end):
            self._row_tables[i] = None  # the row no longer mirrors a sequence's table
        host, scratch = self._host_np, self.scratch_block
        host[0, start:end] = 0
        host[1, start:end] = 0
        host[2, start:end] = scratch * self.block_size
        host[3, start:end] = 1
        self._host_tables_np[start:end, 0] = scratch

    def _meta(self, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._inputs[2, :bucket],
            query_start_loc=list(range(bucket + 1)),
            context_lens=self._inputs[3, :bucket],
            block_tables=self._tables[:bucket],
            max_context_len=self.width * self.block_size,
            decode_only=True,
        )

    def _run(self, bucket: int) -> torch.Tensor:
        with graph_kernels():  # the same kernels in a capture and in its eager twin
            return self.forward(self._inputs[0, :bucket], self._inputs[1, :bucket],
                                self._meta(bucket))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (mode "capture"; a no-op in "static").

        Each bucket runs twice eagerly on a side stream first (Triton kernels compile, lazy
        tables are built), then is captured into one shared memory pool; the buffers hold
        padding rows meanwhile, so capture touches only the scratch block.
        """
        if self.mode != "capture":
            return
        pool = None
        for bucket in reversed(self.buckets):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run(bucket)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[bucket] = self._run(bucket)
            pool = graph.pool()
            self._graphs[bucket] = graph
        torch.cuda.synchronize(self.device)

    def bucket_for(self, batch: int) -> int | None:
        """The smallest bucket holding `batch` rows, or None when it exceeds max_batch."""
        for bucket in self.buckets:
            if bucket >= batch:
                return bucket
        return None

    def run(self, seqs: Sequence[Seq]) -> torch.Tensor:
        """Logits `[len(seqs), vocab]` float32 for one decode step of `seqs` (each computes
        its token at `num_computed_tokens`). The tensor is a view of a static buffer: valid
        until the next `run`."""
        batch = len(seqs)
        bucket = self.bucket_for(batch)
        if bucket is None or batch == 0:
            raise ValueError(f"batch of {batch} sequences outside [1, {self.max_batch}]")
        self._stage(seqs, bucket)
        # whole (contiguous) staging rows: [4, max_batch] is a few KB; tables by row prefix
        self._inputs.copy_(self._host, non_blocking=True)
        self._tables[:bucket].copy_(self._host_tables[:bucket], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.num_replays += 1
        graph = self._graphs.get(bucket)
        if graph is None:
            return self._run(bucket)[:batch]
        graph.replay()
        return self._outputs[bucket][:batch]

    def _stage(self, seqs: Sequence[Seq], bucket: int) -> None:
        """Write the step's rows into the pinned host staging once the previous step's
        copies out of it are done (usually long since: fetching its tokens synchronized)."""
        if self._copied is not None:
            self._copied.synchronize()
        bs = self.block_size
        tables, row_tables, row_blocks = self._host_tables_np, self._row_tables, self._row_blocks
        tokens, positions, slots = [], [], []
        for i, seq in enumerate(seqs):
            pos = seq.num_computed_tokens
            table = seq.block_table
            num_blocks = pos // bs + 1
            tokens.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            # A table only grows in place (a reset replaces the list), so a row that still
            # mirrors this list needs only its new entries.
            done = row_blocks[i] if row_tables[i] is table else 0
            if done < num_blocks:
                tables[i, done:num_blocks] = table[done:num_blocks]
                row_tables[i], row_blocks[i] = table, num_blocks
        n = len(seqs)
        host = self._host_np
        host[0, :n] = tokens
        host[1, :n] = positions
        host[2, :n] = slots
        host[3, :n] = positions
        host[3, :n] += 1
        self._fill_padding(n, bucket)

