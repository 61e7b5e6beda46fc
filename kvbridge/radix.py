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

Imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvbridge.eviction import EvictionPolicy, EvictionQueue, LRUPolicy
from kvbridge.hashing import BlockHash
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


def _common_prefix(key: list[BlockHash], idx: int, hashes: list[BlockHash], pos: int) -> int:
    """Length of the common run of key[idx:] and hashes[pos:] (slice compare first)."""
    limit = min(len(key) - idx, len(hashes) - pos)
    if key[idx : idx + limit] == hashes[pos : pos + limit]:
        return limit
    same = 0
    while same < limit and key[idx + same] == hashes[pos + same]:
        same += 1
    return same


class RadixTree:
    """The index; see the module docstring. Not thread-safe: one owner serializes calls."""

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

    # ---- access, locks ----
    def touch(self, node: Node) -> None:
        """Marks ``node`` and its ancestors accessed now (the store calls it on a hit)."""
        self._clock += 1
        walk: Node | None = node
        while walk is not None and walk is not self.root:
            walk.last_access = self._clock
            walk = walk.parent
        self._refresh(node)

    def split_at(self, match: MatchResult) -> Node:
        """Makes the match end on a node boundary; returns the node ending at its last block.

        Changes structure only (no blocks, values or events change); use it before ``lock``
        so a lock covers exactly the matched prefix.
        """
        node = match.last_node
        if node is not self.root and match.last_node_blocks < len(node.key):
            self._split(node, match.last_node_blocks)
            if node.parent is None:
                raise RuntimeError("split left the matched node without a parent")
            return node.parent
        return node

    def lock(self, node: Node) -> None:
        """Adds a reference on ``node`` and every ancestor; they cannot be evicted."""
        self._check_alive(node, "lock")
        node.direct_locks += 1
        walk: Node | None = node
        while walk is not None:
            walk.lock_ref += 1
            walk = walk.parent

    def unlock(self, node: Node) -> None:
        """Drops a reference taken by ``lock``; ValueError if ``node`` holds none."""
        self._check_alive(node, "unlock")
        if node.direct_locks == 0:
            raise ValueError(f"unlock: node {node.uid} holds no lock")
        node.direct_locks -= 1
        walk: Node | None = node
        while walk is not None:
            walk.lock_ref -= 1
            walk = walk.parent
        self._refresh(node)

    # ---- insertion ----
    def insert(
        self,
        hashes: Sequence[BlockHash],
        values: Sequence[int],
        parent_hash: BlockHash | None = None,
    ) -> int:
        """Indexes a chain; returns how many blocks were new. Existing blocks keep their values.

        ``parent_hash`` names the block before hashes[0]: the chain attaches under it when it
        is indexed here, else becomes an anchored root-level segment. Marks the path accessed.
        """
        if len(hashes) != len(values):
            raise ValueError(f"values: expected {len(hashes)} values, got {len(values)}")
        if not hashes:
            return 0
        hashes = hashes if isinstance(hashes, list) else list(hashes)
        self._check_chain(hashes, parent_hash)
        self._clock += 1
        node, idx = self._cursor_after(parent_hash)
        pos, total, new_blocks = 0, len(hashes), 0
        while pos < total:
            if idx < len(node.key):
                same = _common_prefix(node.key, idx, hashes, pos)
                if same:
                    idx, pos = idx + same, pos + same
                    continue
                self._split(node, idx)
                node = node.parent  # type: ignore[assignment]
            else:
                child = node.children.get(hashes[pos])
                if child is not None:
                    node, idx = child, 0
                    continue
                end = self._new_run(node, hashes, values, pos, parent_hash)
                new_blocks += end - pos
                pos = end
                node = self._where[hashes[end - 1]]
                idx = node.key.index(hashes[end - 1]) + 1
                continue
            idx = len(node.key)
        self._touch_up(node)
        return new_blocks

    def insert_batch(self, chains: Sequence[Chain]) -> int:
        """``insert`` for each chain in order; returns the total of new blocks."""
        return sum(self.insert(c.hashes, c.values, c.parent_hash) for c in chains)

    def _check_chain(self, hashes: list[BlockHash], parent_hash: BlockHash | None) -> None:
        """ValueError (before any change) if an indexed block of ``hashes`` has another parent.

        Blocks reached by a walk from the root are consistent by construction; only the rest
        needs a per-block look, and usually none of it is indexed."""
        start = 0
        if parent_hash is None or parent_hash not in self._where:
            start = self.match_prefix(hashes).num_blocks
        if self._where.keys().isdisjoint(hashes[start:]):
            return
        for i in range(start, len(hashes)):
            block_hash = hashes[i]
            node = self._where.get(block_hash)
            if node is None:
                continue
            stored = node.parent_hash_of(node.key.index(block_hash))
            given = hashes[i - 1] if i else parent_hash
            if stored != given:
                raise ValueError(
                    f"hashes[{i}] is already indexed under a different parent (not a chain)"
                )

    def _cursor_after(self, parent_hash: BlockHash | None) -> tuple[Node, int]:
        if parent_hash is None or parent_hash not in self._where:
            return self.root, 0
        node = self._where[parent_hash]
        return node, node.key.index(parent_hash) + 1

    def _new_run(
        self,
        parent: Node,
        hashes: list[BlockHash],
        values: Sequence[int],
        pos: int,
        parent_hash: BlockHash | None,
    ) -> int:
        """Creates a run from hashes[pos:] up to the first hash already indexed (an anchored
        segment that continues it, which gets adopted); returns where the run ends."""
        end = len(hashes)
        if not self._where.keys().isdisjoint(hashes[pos:]):
            end = pos
            while end < len(hashes) and hashes[end] not in self._where:
                end += 1
        if end == pos:
            raise RuntimeError(f"hashes[{pos}] is indexed but was not reached by the walk")
        node = self._make_node(parent, hashes[pos:end], list(values[pos:end]))
        if parent is self.root:
            node.anchor = hashes[pos - 1] if pos > 0 else parent_hash
            if node.anchor is not None:
                self._anchored.setdefault(node.anchor, []).append(node)
        self._emit(BlockStored(tuple(node.key), node.parent_hash_of(0)))
        self._adopt_orphans(node)
        self._refresh(node)
        return end

    def _make_node(self, parent: Node, key: list[BlockHash], values: list[int]) -> Node:
        node = Node(self._next_uid, self._clock)
        self._next_uid += 1
        node.key, node.values, node.parent = key, values, parent
        parent.children[key[0]] = node
        self._where.update(dict.fromkeys(key, node))
        return node

    def _adopt_orphans(self, node: Node) -> None:
        """Re-attaches anchored root segments whose anchor is one of ``node``'s blocks."""
        if not self._anchored or self._anchored.keys().isdisjoint(node.key):
            return
        for block_hash in list(node.key):
            orphans = self._anchored.pop(block_hash, None)
            if not orphans:
                continue
            holder = self._where[block_hash]
            cut = holder.key.index(block_hash) + 1
            if cut < len(holder.key):
                self._split(holder, cut)
                holder = holder.parent  # type: ignore[assignment]
            for orphan in orphans:
                del self.root.children[orphan.key[0]]
                orphan.anchor = None
                orphan.parent = holder
                holder.children[orphan.key[0]] = orphan
                walk: Node | None = holder
                while walk is not None and walk is not self.root:
                    walk.lock_ref += orphan.lock_ref
                    walk = walk.parent

    def _split(self, node: Node, cut: int) -> None:
        """Moves node.key[:cut] into a new parent; ``node`` keeps the tail (and its locks)."""
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

    def _touch_up(self, node: Node) -> None:
        walk: Node | None = node
        while walk is not None and walk is not self.root:
            walk.last_access = self._clock
            walk = walk.parent
        self._refresh(node)

    # ---- removal ----
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

    def detach(self, hashes: Sequence[BlockHash], start: int = 0) -> list[int]:
        """Removes the run hashes[start:] (which must match from a root-level run and hold no
        direct lock) and returns its values; blocks hanging below it stay, re-rooted as
        segments anchored at their removed parent. Not an eviction (the store moves them)."""
        match = self.match_prefix(hashes, start)
        if match.num_blocks != len(hashes) - start:
            raise ValueError(
                f"detach: only {match.num_blocks} of {len(hashes) - start} blocks are indexed here"
            )
        if match.num_blocks == 0:
            return []
        path: list[Node] = []
        walk: Node | None = self.split_at(match)
        while walk is not None and walk is not self.root:
            path.append(walk)
            walk = walk.parent
        path.reverse()
        if any(n.direct_locks for n in path):
            raise ValueError("detach: a block on the path is locked")
        on_path = {n.uid for n in path}
        for node in path:
            for child in list(node.children.values()):
                if child.uid not in on_path:
                    self._reroot(child, node.key[-1])
            node.children.clear()
        self._remove_node(path[0])
        for node in path[1:]:
            self._forget(node)
        self._emit(BlockRemoved(tuple(hashes[start:])))
        return match.values

    def _reroot(self, child: Node, anchor: BlockHash) -> None:
        child.parent = self.root
        child.anchor = anchor
        self.root.children[child.key[0]] = child
        self._anchored.setdefault(anchor, []).append(child)

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

    # ---- helpers ----
    def _is_evictable(self, node: Node) -> bool:
        return node.alive and node.lock_ref == 0 and not node.children and node is not self.root

    def _refresh(self, node: Node) -> None:
        if self._is_evictable(node):
            self._queue.push(node)

    def _check_alive(self, node: Node, op: str) -> None:
        if not node.alive:
            raise ValueError(f"{op}: node {node.uid} was removed from the index")

    def _emit(self, event: RadixEvent) -> None:
        if self.listener is not None:
            self.listener(event)

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
