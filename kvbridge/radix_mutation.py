"""Structural changes of the radix index: insert, split, detach and anchored segments.

``RadixMutation`` adds to ``RadixNodes`` every operation that adds or removes indexed blocks
without evicting: ``insert`` (attaching under a parent block, or as an anchored root-level
segment when that parent lives elsewhere, adopting anchored segments it now precedes),
``split_at`` (a node boundary at a match's end) and ``detach`` (removing a run, re-rooting
what hangs below it as anchored segments). Listeners see ``BlockStored`` for every new run and
``BlockRemoved`` for every detached run. Not thread-safe. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvbridge.hashing import BlockHash
from kvbridge.radix_nodes import RadixNodes
from kvbridge.radix_types import BlockRemoved, BlockStored, Chain, MatchResult, Node


def _common_prefix(key: list[BlockHash], idx: int, hashes: list[BlockHash], pos: int) -> int:
    """Length of the common run of key[idx:] and hashes[pos:] (slice compare first)."""
    limit = min(len(key) - idx, len(hashes) - pos)
    if key[idx : idx + limit] == hashes[pos : pos + limit]:
        return limit
    same = 0
    while same < limit and key[idx + same] == hashes[pos + same]:
        same += 1
    return same


class RadixMutation(RadixNodes):
    """Insert / split / detach on top of the node structure (see the module docstring)."""

    def split_at(self, match: MatchResult) -> Node:
        """Makes the match end on a node boundary; returns the node ending at its last block.

        Changes structure only (no blocks, values or events change); use it before ``lock``
        so a lock covers exactly the matched prefix.
        """
        node = match.last_node
        if node is not self.root and match.last_node_blocks < len(node.key):
            return self._split(node, match.last_node_blocks)
        return node

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
                node = self._split(node, idx)
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
        self._touch_path(node)
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
            anchor = hashes[pos - 1] if pos > 0 else parent_hash
            if anchor is not None:
                self._anchor_at_root(node, anchor)
        self._emit(BlockStored(tuple(node.key), node.parent_hash_of(0)))
        self._adopt_orphans(node)
        self._refresh(node)
        return end

    def _adopt_orphans(self, node: Node) -> None:
        """Re-attaches anchored root segments whose anchor is one of ``node``'s blocks."""
        if not self._anchored or self._anchored.keys().isdisjoint(node.key):
            return
        for block_hash in list(node.key):
            orphans = self._anchored.pop(block_hash, None)
            if not orphans:
                continue
            holder = self._split_after(block_hash)
            for orphan in orphans:
                del self.root.children[orphan.key[0]]
                orphan.anchor = None
                orphan.parent = holder
                holder.children[orphan.key[0]] = orphan
                # The root already counted the orphan's locks; the new ancestors had not.
                self._add_lock_ref(holder, orphan.lock_ref)

    # ---- removal (not eviction) ----
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
