"""Test helper: drives a CausalLM through the paged path with real, scattered block tables."""

from __future__ import annotations

import torch

from backends.engine.model_api import AttentionMetadata


class PagedHarness:
    """Owns KV caches and per-sequence block lists (blocks handed out in a shuffled order, so
    tables are not contiguous). `step` runs one flattened step and returns logits [T, vocab]."""

    def __init__(self, model: torch.nn.Module, block_size: int, num_blocks: int = 64) -> None:
        self.model = model
        self.block_size = block_size
        self.caches = [torch.zeros(num_blocks, block_size, model.kv_width)
                       for _ in range(model.num_layers)]
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(7)).tolist()
        self.blocks: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def _slot(self, seq: int, pos: int) -> int:
        blocks = self.blocks.setdefault(seq, [])
        while len(blocks) <= pos // self.block_size:
            blocks.append(self.free.pop())
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def step(self, chunks: list[tuple[int, list[int]]], decode_only: bool = False) -> torch.Tensor:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        for seq, tokens in chunks:
            start = self.lens.get(seq, 0)
            for i, tok in enumerate(tokens):
                ids.append(tok)
                positions.append(start + i)
                slots.append(self._slot(seq, start + i))
            self.lens[seq] = start + len(tokens)
            starts.append(len(ids))
        seqs = [seq for seq, _ in chunks]
        width = max(len(self.blocks[s]) for s in seqs)
        table = torch.zeros(len(seqs), width, dtype=torch.int32)
        for row, seq in enumerate(seqs):
            table[row, : len(self.blocks[seq])] = torch.tensor(self.blocks[seq])
        context = torch.tensor([self.lens[s] for s in seqs], dtype=torch.int64)
        meta = AttentionMetadata(torch.tensor(slots), starts, context, table,
                                 int(context.max()), decode_only)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.caches)
            return self.model.compute_logits(hidden)
