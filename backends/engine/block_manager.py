"""Ref-counted allocator of fixed-size KV blocks.

The manager only accounts: which block ids are free and how many holders each used block has.
It never touches KV data. Block tables (lists of block ids) belong to sequences; the manager
grows and frees them.

Each block has a generation, bumped whenever the block is handed out (before any KV is written
into it), so a reader in another process that saw generation g before and after reading a block
knows nobody wrote it in between. ``use_generations`` moves the counters into an array the
caller provides (e.g. one in shared memory).
"""

from __future__ import annotations

from collections import deque
from collections.abc import MutableSequence
from typing import NewType

BlockId = NewType("BlockId", int)


class BlockManager:
    """A pool of `num_blocks` blocks of `block_size` tokens with a FIFO free list."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._free: deque[BlockId] = deque(BlockId(i) for i in range(num_blocks))
        self.generations: MutableSequence[int] = [0] * num_blocks

    def use_generations(self, array: MutableSequence[int]) -> None:
        """Keep the generations in `array` (len num_total_blocks) from now on, current values
        copied in."""
        if len(array) != self.num_total_blocks:
            raise ValueError(f"generations: expected {self.num_total_blocks} entries, got {len(array)}")
        array[:] = self.generations
        self.generations = array

    @property
    def num_total_blocks(self) -> int:
        return len(self._ref_counts)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def blocks_needed(self, table: list[BlockId], num_tokens: int) -> int:
        """Blocks to add to `table` so that it holds `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[BlockId]:
        """Take `num_blocks` free blocks (ref count 1). RuntimeError if too few are free."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"allocate({num_blocks}) with only {len(self._free)} free blocks")
        taken = [self._free.popleft() for _ in range(num_blocks)]
        for block_id in taken:
            self._ref_counts[block_id] = 1
            self.generations[block_id] += 1
        return taken

    def append_slots(self, table: list[BlockId], num_tokens: int) -> None:
        """Grow `table` in place until it holds `num_tokens` tokens (check can_allocate first)."""
        table.extend(self.allocate(self.blocks_needed(table, num_tokens)))

    def share(self, block_ids: list[BlockId]) -> None:
        """Add one holder to each used block (e.g. a second table pointing at it)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise RuntimeError(f"share of free block {block_id}")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[BlockId]) -> None:
        """Drop one holder of each block; blocks nobody holds go back to the free list."""
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free.append(block_id)

    def check_integrity(self) -> None:
        """RuntimeError unless free + used == total and the free list matches the ref counts."""
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            raise RuntimeError("a block is on the free list twice")
        used = sum(1 for count in self._ref_counts if count > 0)
        if used + len(free_set) != self.num_total_blocks:
            raise RuntimeError(
                f"free {len(free_set)} + used {used} != total {self.num_total_blocks}"
            )
        for block_id, count in enumerate(self._ref_counts):
            if count < 0 or (count == 0) != (block_id in free_set):
                raise RuntimeError(f"block {block_id} has ref count {count} vs free list")
