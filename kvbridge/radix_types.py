"""Value types of the radix index: nodes, events, match results and chains.

Imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

from kvbridge.hashing import BlockHash


@dataclasses.dataclass(frozen=True, slots=True)
class BlockStored:
    hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash | None


@dataclasses.dataclass(frozen=True, slots=True)
class BlockRemoved:
    hashes: tuple[BlockHash, ...]


RadixEvent = BlockStored | BlockRemoved
RadixListener = Callable[[RadixEvent], None]


class EvictedBlock(NamedTuple):
    hash: BlockHash
    value: int
    parent_hash: BlockHash | None


class Chain(NamedTuple):
    """One chain for ``insert_batch``: hashes, their values, and the hash before hashes[0]."""

    hashes: Sequence[BlockHash]
    values: Sequence[int]
    parent_hash: BlockHash | None = None


class Node:
    """A run of blocks. Owned by its RadixTree; callers only hold it as a lock handle."""

    __slots__ = (
        "key", "values", "parent", "children", "lock_ref", "direct_locks",
        "last_access", "created_at", "uid", "anchor", "alive",
    )  # fmt: skip

    def __init__(self, uid: int, clock: int) -> None:
        self.key: list[BlockHash] = []
        self.values: list[int] = []
        self.parent: Node | None = None
        self.children: dict[BlockHash, Node] = {}
        self.lock_ref = 0
        self.direct_locks = 0
        self.last_access = clock
        self.created_at = clock
        self.uid = uid
        self.anchor: BlockHash | None = None
        self.alive = True

    def parent_hash_of(self, index: int) -> BlockHash | None:
        """Hash of the block before key[index] (None at a true sequence start)."""
        if index > 0:
            return self.key[index - 1]
        parent = self.parent
        if parent is None or not parent.key:
            return self.anchor
        return parent.key[-1]


@dataclasses.dataclass(frozen=True, slots=True)
class MatchResult:
    """``num_blocks`` matched from ``start``; ``last_node`` holds the last matched block and
    ``last_node_blocks`` of its run matched (the root and 0 on a miss)."""

    num_blocks: int
    values: list[int]
    last_node: Node
    last_node_blocks: int
