"""The radix index's node structure: runs of blocks, the hash map, anchored segments, matching.

``RadixNodes`` owns the state every part of the index shares: the root, the hash -> node map,
the registry of anchored root-level segments (keyed by their anchor hash), the logical clock,
the eviction queue and the listener. It answers read-only queries (``match_prefix`` never
modifies anything) and provides the structural primitives the mutating layers build on:
creating, splitting, re-rooting and removing nodes while keeping the hash map, the anchor
registry and the eviction queue in step. Mutation (radix_mutation.py) and locking, eviction
and integrity (radix.py) sit on top. Not thread-safe. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvbridge.eviction import EvictionPolicy, EvictionQueue, LRUPolicy
from kvbridge.hashing import BlockHash
from kvbridge.radix_types import MatchResult, Node, RadixEvent, RadixListener


class RadixNodes:
    """Shared state, queries and structural primitives of the index (see the module doc)."""

    def __init__(
        self, policy: EvictionPolicy | None = None, listener: RadixListener | None = None
    ) -> None:
        self._clock = 0
        self._next_uid = 1
        self.root = Node(0, 0)
        self._where: dict[BlockHash, Node] = {}
        self._anchored: dict[BlockHash, list[Node]] = {}
        self._queue: EvictionQueue[Node] = EvictionQueue(policy or LRUPolicy())
        self.listener = listener

    # ---- queries (never modify) ----
    @property
    def num_blocks(self) -> int:
        return len(self._where)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._where

    def blocks(self) -> Iterator[tuple[BlockHash, int]]:
        """Every (hash, value) indexed here, in no particular order."""
        for block_hash, node in self._where.items():
            yield block_hash, node.values[node.key.index(block_hash)]

    def value_of(self, block_hash: BlockHash) -> int:
        node = self._where[block_hash]
        return node.values[node.key.index(block_hash)]

    def match_prefix(self, hashes: Sequence[BlockHash], start: int = 0) -> MatchResult:
        """Longest run of ``hashes[start:]`` found here, starting at a root-level run."""
        hashes = hashes if isinstance(hashes, list) else list(hashes)
        node, pos, total = self.root, start, len(hashes)
        values: list[int] = []
        last, last_blocks = self.root, 0
        while pos < total:
            child = node.children.get(hashes[pos])
            if child is None:
                break
            key = child.key
            run = len(key)
            if run <= total - pos and hashes[pos : pos + run] == key:
                matched = run
                values.extend(child.values)
            else:
                matched = 1
                limit = min(run, total - pos)
                while matched < limit and key[matched] == hashes[pos + matched]:
                    matched += 1
                values.extend(child.values[:matched])
            pos += matched
            last, last_blocks = child, matched
            if matched < run:
                break
            node = child
        return MatchResult(pos - start, values, last, last_blocks)

    # ---- structural primitives ----
    def _make_node(self, parent: Node, key: list[BlockHash], values: list[int]) -> Node:
        node = Node(self._next_uid, self._clock)
        self._next_uid += 1
        node.key, node.values, node.parent = key, values, parent
        parent.children[key[0]] = node
        self._where.update(dict.fromkeys(key, node))
        return node

    def _split(self, node: Node, cut: int) -> Node:
        """Moves node.key[:cut] into a new parent and returns it; ``node`` keeps the tail (and
        its locks). An anchored segment's anchor moves to the new head."""
        parent = node.parent
        if parent is None or not 0 < cut < len(node.key):
            raise RuntimeError(f"split of node {node.uid} at {cut} is invalid")
        head = Node(self._next_uid, node.created_at)
        self._next_uid += 1
        head.key, head.values = node.key[:cut], node.values[:cut]
        head.parent, head.children = parent, {node.key[cut]: node}
        head.lock_ref, head.last_access, head.anchor = node.lock_ref, node.last_access, node.anchor
        if node.anchor is not None:
            peers = self._anchored[node.anchor]
            peers[peers.index(node)] = head
        parent.children[head.key[0]] = head
        node.key, node.values, node.parent, node.anchor = (
            node.key[cut:],
            node.values[cut:],
            head,
            None,
        )
        self._where.update(dict.fromkeys(head.key, head))
        return head

    def _split_after(self, block_hash: BlockHash) -> Node:
        """Splits the run holding ``block_hash`` right after it (if needed); returns the node
        whose run now ends with ``block_hash``."""
        holder = self._where[block_hash]
        cut = holder.key.index(block_hash) + 1
        return self._split(holder, cut) if cut < len(holder.key) else holder

    def _anchor_at_root(self, node: Node, anchor: BlockHash) -> None:
        """Registers root-level ``node`` as a segment whose parent block is ``anchor``."""
        node.anchor = anchor
        self._anchored.setdefault(anchor, []).append(node)

    def _reroot(self, child: Node, anchor: BlockHash) -> None:
        child.parent = self.root
        self.root.children[child.key[0]] = child
        self._anchor_at_root(child, anchor)

    def _remove_node(self, node: Node) -> None:
        parent = node.parent
        if parent is None:
            raise RuntimeError("cannot remove the root")
        del parent.children[node.key[0]]
        if node.anchor is not None:
            peers = self._anchored[node.anchor]
            peers.remove(node)
            if not peers:
                del self._anchored[node.anchor]
        self._forget(node)
        self._refresh(parent)

    def _forget(self, node: Node) -> None:
        for block_hash in node.key:
            del self._where[block_hash]
        node.alive = False
        node.parent = None
        self._queue.discard(node)

    def _add_lock_ref(self, node: Node, delta: int) -> None:
        """Adds ``delta`` to the lock count of ``node`` and its ancestors, root excluded."""
        walk: Node | None = node
        while walk is not None and walk is not self.root:
            walk.lock_ref += delta
            walk = walk.parent

    def _touch_path(self, node: Node) -> None:
        """Stamps ``node`` and its ancestors with the current clock and requeues ``node``."""
        walk: Node | None = node
        while walk is not None and walk is not self.root:
            walk.last_access = self._clock
            walk = walk.parent
        self._refresh(node)

    # ---- eviction queue, events ----
    def _is_evictable(self, node: Node) -> bool:
        return node.alive and node.lock_ref == 0 and not node.children and node is not self.root

    def _refresh(self, node: Node) -> None:
        if self._is_evictable(node):
            self._queue.push(node)

    def _emit(self, event: RadixEvent) -> None:
        if self.listener is not None:
            self.listener(event)
