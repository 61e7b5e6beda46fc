"""Block-granular radix index keyed by chained block hashes.

Each node holds a *run* of blocks (hashes + one int value each, e.g. a pool slot); children
are keyed by the first hash of their run, so a match walks one dict lookup per run and
compares runs as list slices. Because block hashes are chained (a hash names its whole
prefix), the index may also hold *anchored segments*: a run whose parent block lives
elsewhere (another tier, another node). Such a run hangs off the root, remembers its
``anchor`` (parent hash), is found by ``match_prefix(hashes, start)`` at its own depth, and is
re-attached automatically when its anchor block is inserted here. Invariant: a run is a child
of the node holding its parent block iff that block is in this index.

Contracts:
- ``match_prefix`` never modifies the index (not even access times); call ``touch`` on a hit.
- ``lock``/``unlock`` count references on a node and all its ancestors; locked nodes and
  nodes with children are never evicted. ``evict`` takes blocks from the tail of the
  lowest-priority unlocked leaf (LRU by a logical clock by default; see eviction.py).
- Listeners see ``BlockStored`` for every newly indexed run and ``BlockRemoved`` for every
  evicted or detached run, hashes in chain order.

Layers: radix_types.py (value types), radix_nodes.py (node structure, matching),
radix_mutation.py (insert / split / detach), this module (access, locks, eviction, integrity).
Imports no torch.
"""

from __future__ import annotations

from kvbridge.hashing import BlockHash
from kvbridge.radix_mutation import RadixMutation
from kvbridge.radix_types import (
    BlockRemoved,
    BlockStored,
    Chain,
    EvictedBlock,
    MatchResult,
    Node,
    RadixEvent,
    RadixListener,
)

__all__ = [
    "BlockRemoved",
    "BlockStored",
    "Chain",
    "EvictedBlock",
    "MatchResult",
    "Node",
    "RadixEvent",
    "RadixListener",
    "RadixTree",
]


class RadixTree(RadixMutation):
    """The index; see the module docstring. Not thread-safe: one owner serializes calls."""

    # ---- access, locks ----
    def touch(self, node: Node) -> None:
        """Marks ``node`` and its ancestors accessed now (the store calls it on a hit)."""
        self._clock += 1
        self._touch_path(node)

    def lock(self, node: Node) -> None:
        """Adds a reference on ``node`` and every ancestor; they cannot be evicted."""
        self._check_alive(node, "lock")
        node.direct_locks += 1
        self._add_lock_ref(node, 1)
        self.root.lock_ref += 1

    def unlock(self, node: Node) -> None:
        """Drops a reference taken by ``lock``; ValueError if ``node`` holds none."""
        self._check_alive(node, "unlock")
        if node.direct_locks == 0:
            raise ValueError(f"unlock: node {node.uid} holds no lock")
        node.direct_locks -= 1
        self._add_lock_ref(node, -1)
        self.root.lock_ref -= 1
        self._refresh(node)

    def _check_alive(self, node: Node, op: str) -> None:
        if not node.alive:
            raise ValueError(f"{op}: node {node.uid} was removed from the index")

    # ---- eviction ----
    def evict(self, num_blocks: int) -> list[EvictedBlock]:
        """Removes up to ``num_blocks`` blocks, deepest first, from the lowest-priority
        unlocked leaves; returns them in eviction order. A leaf whose run empties is removed,
        which may make its parent an eligible leaf."""
        out: list[EvictedBlock] = []
        while len(out) < num_blocks:
            node = self._queue.pop(self._is_evictable)
            if node is None:
                break
            take = min(len(node.key), num_blocks - len(out))
            cut = len(node.key) - take
            for i in range(len(node.key) - 1, cut - 1, -1):
                out.append(EvictedBlock(node.key[i], node.values[i], node.parent_hash_of(i)))
            self._emit(BlockRemoved(tuple(node.key[cut:])))
            if cut == 0:
                self._remove_node(node)
            else:
                for block_hash in node.key[cut:]:
                    del self._where[block_hash]
                del node.key[cut:], node.values[cut:]
                self._queue.push(node)
        return out

    # ---- integrity ----
    def check_integrity(self) -> None:
        """RuntimeError unless links, block counts, lock counts, anchors and the eviction
        queue are consistent (the evictable set is exactly the unlocked leaves)."""
        seen = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            child_locks = 0
            for first, child in node.children.items():
                self._check_node(node, first, child)
                child_locks += child.lock_ref
                seen += len(child.key)
                stack.append(child)
            if node.lock_ref != node.direct_locks + child_locks or node.direct_locks < 0:
                raise RuntimeError(
                    f"node {node.uid}: lock_ref {node.lock_ref} != direct {node.direct_locks}"
                    f" + children {child_locks}"
                )
            if self._is_evictable(node) and self._queue.live_entry(node) != (
                self._queue.policy.priority(node)
            ):
                raise RuntimeError(f"node {node.uid}: evictable leaf missing from the queue")
        if seen != len(self._where):
            raise RuntimeError(
                f"tree holds {seen} blocks but the hash map holds {len(self._where)}"
            )
        registered = sum(len(v) for v in self._anchored.values())
        anchored = sum(1 for c in self.root.children.values() if c.anchor is not None)
        if registered != anchored:
            raise RuntimeError(f"{registered} anchored segments registered, {anchored} present")

    def _check_node(self, parent: Node, first: BlockHash, node: Node) -> None:
        if not node.alive or node.parent is not parent or not node.key or node.key[0] != first:
            raise RuntimeError(f"node {node.uid}: broken link under node {parent.uid}")
        if len(node.key) != len(node.values) or node.last_access > self._clock:
            raise RuntimeError(f"node {node.uid}: {len(node.key)} keys, {len(node.values)} values")
        if any(self._where.get(h) is not node for h in node.key):
            raise RuntimeError(f"node {node.uid}: hash map disagrees with its run")
        if parent is not self.root and node.anchor is not None:
            raise RuntimeError(f"node {node.uid}: attached but still anchored")
        if parent is self.root and node.anchor is not None:
            if node.anchor in self._where:
                raise RuntimeError(
                    f"node {node.uid}: anchor is indexed but the run is not attached"
                )
            if node not in self._anchored.get(node.anchor, []):
                raise RuntimeError(f"node {node.uid}: anchored segment not registered")
