"""Block-granular radix index keyed by chained block hashes; the tier is a property of a node.

Each node holds a *run* of blocks (hashes + one int value each, e.g. a pool slot) of one
*tier* (``active`` / ``hot`` / ``cold``, as SGLang's HiRadixCache marks device / host /
storage per node); children are keyed by the first hash of their run, so a match walks one
dict lookup per run and compares runs as list slices. A tree used without tiers keeps every
block ``active``. Because block hashes are chained (a hash names its whole prefix), the index
may also hold *anchored segments*: a run whose parent block is not indexed (it was evicted,
or lives on another machine). Such a run hangs off the root, remembers its ``anchor`` (parent
hash), is found by ``match_prefix(hashes, start)`` at its own depth, and is re-attached
automatically when its anchor block is inserted. Invariant: a run is a child of the node
holding its parent block iff that block is indexed.

Tiers partition the tree: locks, access times and eviction act per tier, as if each tier were
a tree of its own in which a run whose parent block is in another tier sits at the root. A
lock counts on its node and the same-tier ancestors above it; ``touch`` stamps the same; a
node is an eviction candidate of its tier when it holds no lock and no child of its tier
(children of other tiers are re-rooted as anchored segments when it goes).

Contracts:
- ``match_prefix`` and ``match_tiers`` never modify the index (not even access times); call
  ``touch`` on a hit.
- ``lock``/``unlock`` count references (see above); locked nodes and nodes with a child of
  their tier are never evicted. ``evict`` takes blocks from the tail of the lowest-priority
  candidate of one tier (LRU by a logical clock by default; see eviction.py).
- Listeners see ``BlockStored`` for every newly indexed run and ``BlockRemoved`` for every
  evicted or detached run, hashes in chain order; ``tier_listener`` also gets their tier.

Not thread-safe: one owner serializes calls. Imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NamedTuple

from kvbridge.eviction import EvictionPolicy, EvictionQueue, LRUPolicy
from kvbridge.hashing import BlockHash

__all__ = [
    "TIERS",
    "BlockRemoved",
    "BlockStored",
    "Chain",
    "EvictedBlock",
    "MatchResult",
    "Node",
    "RadixEvent",
    "RadixListener",
    "RadixTree",
    "TierListener",
    "TierName",
    "TierRun",
]

TierName = Literal["active", "hot", "cold"]
TIERS: tuple[TierName, ...] = ("active", "hot", "cold")


# ---- value types ----
@dataclasses.dataclass(frozen=True, slots=True)
class BlockStored:
    hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash | None


@dataclasses.dataclass(frozen=True, slots=True)
class BlockRemoved:
    hashes: tuple[BlockHash, ...]


RadixEvent = BlockStored | BlockRemoved
RadixListener = Callable[[RadixEvent], None]
TierListener = Callable[[TierName, RadixEvent], None]


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
    """A run of blocks of one tier. Owned by its RadixTree; callers only hold it as a lock
    handle. ``tier`` is set once, at creation (a block changes tier by leaving and being
    inserted again)."""

    __slots__ = (
        "key", "values", "parent", "children", "lock_ref", "direct_locks",
        "last_access", "created_at", "uid", "anchor", "alive", "tier",
    )  # fmt: skip

    def __init__(self, uid: int, clock: int, tier: TierName = "active") -> None:
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
        self.tier: TierName = tier

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


@dataclasses.dataclass(frozen=True, slots=True)
class TierRun:
    """hashes[start:end] of a match are held by ``tier`` with these values."""

    tier: TierName
    start: int
    end: int
    values: list[int]


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
        self,
        policy: EvictionPolicy | None = None,
        listener: RadixListener | None = None,
        tier_listener: TierListener | None = None,
    ) -> None:
        self._clock = 0
        self._next_uid = 1
        self.root = Node(0, 0)
        self._where: dict[BlockHash, Node] = {}
        self._anchored: dict[BlockHash, list[Node]] = {}
        policy = policy or LRUPolicy()
        self._queues: dict[TierName, EvictionQueue[Node]] = {
            t: EvictionQueue(policy) for t in TIERS
        }
        self._tier_blocks: dict[TierName, int] = dict.fromkeys(TIERS, 0)
        self.listener = listener
        self.tier_listener = tier_listener

    # ---- queries (never modify) ----
    @property
    def num_blocks(self) -> int:
        return len(self._where)

    def num_blocks_in(self, tier: TierName) -> int:
        return self._tier_blocks[tier]

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._where

    def blocks(self, tier: TierName | None = None) -> Iterator[tuple[BlockHash, int]]:
        """Every (hash, value) indexed here (in ``tier`` only, if given), in no particular
        order."""
        for block_hash, node in self._where.items():
            if tier is None or node.tier == tier:
                yield block_hash, node.values[node.key.index(block_hash)]

    def value_of(self, block_hash: BlockHash) -> int:
        node = self._where[block_hash]
        return node.values[node.key.index(block_hash)]

    def tier_of(self, block_hash: BlockHash) -> TierName | None:
        """The tier holding ``block_hash``; None when it is not indexed."""
        node = self._where.get(block_hash)
        return None if node is None else node.tier

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

    def match_tiers(self, hashes: Sequence[BlockHash]) -> list[TierRun]:
        """The longest indexed prefix of ``hashes`` (walked from the root) as consecutive
        runs of one tier each, adjacent runs of one tier merged."""
        hashes = hashes if isinstance(hashes, list) else list(hashes)
        runs: list[TierRun] = []
        node, pos = self.root, 0
        while pos < len(hashes):
            child = node.children.get(hashes[pos])
            if child is None:
                break
            matched = _common_prefix(child.key, 0, hashes, pos)
            if runs and runs[-1].tier == child.tier:
                last = runs[-1]
                runs[-1] = TierRun(last.tier, last.start, pos + matched,
                                   last.values + child.values[:matched])  # fmt: skip
            else:
                runs.append(TierRun(child.tier, pos, pos + matched, child.values[:matched]))
            pos += matched
            if matched < len(child.key):
                break
            node = child
        return runs

    # ---- insertion ----
    def insert(
        self,
        hashes: Sequence[BlockHash],
        values: Sequence[int],
        parent_hash: BlockHash | None = None,
        tier: TierName = "active",
    ) -> int:
        """Indexes a chain; returns how many blocks were new. Existing blocks keep their values
        and tiers; new ones go to ``tier``.

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
                end = self._new_run(node, hashes, values, pos, parent_hash, tier)
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
        tier: TierName,
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
        node = self._make_node(parent, hashes[pos:end], list(values[pos:end]), tier)
        if parent is self.root:
            anchor = hashes[pos - 1] if pos > 0 else parent_hash
            if anchor is not None:
                self._anchor_at_root(node, anchor)
        if self.listener is not None or self.tier_listener is not None:
            self._emit(tier, BlockStored(tuple(node.key), node.parent_hash_of(0)))
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
                if orphan.tier == holder.tier:
                    self._add_lock_ref(holder, orphan.lock_ref)

    def split_at(self, match: MatchResult) -> Node:
        """Makes the match end on a node boundary; returns the node ending at its last block.

        Changes structure only (no blocks, values or events change); use it before ``lock``
        so a lock covers exactly the matched prefix.
        """
        node = match.last_node
        if node is not self.root and match.last_node_blocks < len(node.key):
            return self._split(node, match.last_node_blocks)
        return node

    # ---- access, locks ----
    def touch(self, node: Node) -> None:
        """Marks ``node`` and its same-tier ancestors accessed now (the store calls it on a
        hit)."""
        self._clock += 1
        self._touch_path(node)

    def lock(self, node: Node) -> None:
        """Adds a reference on ``node`` and every same-tier ancestor; they cannot be evicted."""
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

    # ---- removal ----
    def evict(self, num_blocks: int, tier: TierName = "active") -> list[EvictedBlock]:
        """Removes up to ``num_blocks`` blocks of ``tier``, deepest first, from its
        lowest-priority candidates (unlocked, no child of the tier); returns them in eviction
        order. A run that empties is removed, which may make its parent a candidate; children
        of other tiers below a removed block are re-rooted as segments anchored at it."""
        out: list[EvictedBlock] = []
        queue = self._queues[tier]
        while len(out) < num_blocks:
            node = queue.pop(self._is_evictable)
            if node is None:
                break
            key, values = node.key, node.values
            take = min(len(key), num_blocks - len(out))
            cut = len(key) - take
            for i in range(len(key) - 1, cut - 1, -1):
                parent_hash = key[i - 1] if i else node.parent_hash_of(0)
                out.append(EvictedBlock(key[i], values[i], parent_hash))
            if self.listener is not None or self.tier_listener is not None:
                self._emit(tier, BlockRemoved(tuple(key[cut:])))
            if node.children:
                self._reroot_children(node)
            if cut == 0:
                self._remove_node(node)
            else:
                for block_hash in key[cut:]:
                    del self._where[block_hash]
                self._tier_blocks[tier] -= take
                del key[cut:], values[cut:]
                queue.push(node)
        return out

    def detach(self, hashes: Sequence[BlockHash], start: int = 0) -> list[int]:
        """Removes the run hashes[start:] (indexed as one chain from hashes[start], holding no
        direct lock) and returns its values; blocks hanging below it stay, re-rooted as
        segments anchored at their removed parent. Not an eviction (the store moves them)."""
        hashes = hashes if isinstance(hashes, list) else list(hashes)
        want = len(hashes) - start
        first, lo, last, hi, values = self._walk_from(hashes, start)
        if len(values) != want:
            raise ValueError(f"detach: only {len(values)} of {want} blocks are indexed here")
        if first is None or last is None:
            return []
        end = self._split(last, hi) if hi < len(last.key) else last
        if first is last:
            first = end
        if lo > 0:
            self._split(first, lo)
        path: list[Node] = [end]
        while path[-1] is not first:
            parent = path[-1].parent
            if parent is None:
                raise RuntimeError(f"detach: node {first.uid} is not above node {end.uid}")
            path.append(parent)
        path.reverse()
        if any(n.direct_locks for n in path):
            raise ValueError("detach: a block on the path is locked")
        above = first.parent
        if above is not None and above is not self.root and above.tier == first.tier:
            self._add_lock_ref(above, -first.lock_ref)  # off-path locks leave with the path
        on_path = {n.uid for n in path}
        for node in path:
            for child in list(node.children.values()):
                if child.uid not in on_path:
                    self._reroot(child, node.key[-1])
            node.children.clear()
        self._remove_node(first)
        for node in path[1:]:
            self._forget(node)
        self._emit_removed_runs(path)
        return values

    def _walk_from(
        self, hashes: list[BlockHash], start: int
    ) -> tuple[Node | None, int, Node | None, int, list[int]]:
        """Follows hashes[start:] from the node holding hashes[start], modifying nothing:
        (first node, index of hashes[start] in it, last node, end index in it, values)."""
        if start >= len(hashes) or hashes[start] not in self._where:
            return None, 0, None, 0, []
        first = self._where[hashes[start]]
        lo = first.key.index(hashes[start])
        node, idx, pos = first, lo, start
        values: list[int] = []
        while True:
            same = _common_prefix(node.key, idx, hashes, pos)
            values.extend(node.values[idx : idx + same])
            pos, idx = pos + same, idx + same
            child = node.children.get(hashes[pos]) if pos < len(hashes) else None
            if idx < len(node.key) or child is None:
                return first, lo, node, idx, values
            node, idx = child, 0

    def _emit_removed_runs(self, path: list[Node]) -> None:
        """One BlockRemoved per same-tier stretch of ``path`` (parent before child)."""
        run: list[BlockHash] = []
        for i, node in enumerate(path):
            run.extend(node.key)
            if i + 1 == len(path) or path[i + 1].tier != node.tier:
                self._emit(node.tier, BlockRemoved(tuple(run)))
                run = []

    # ---- structural primitives ----
    def _make_node(
        self, parent: Node, key: list[BlockHash], values: list[int], tier: TierName
    ) -> Node:
        node = Node(self._next_uid, self._clock, tier)
        self._next_uid += 1
        node.key, node.values, node.parent = key, values, parent
        parent.children[key[0]] = node
        self._where.update(dict.fromkeys(key, node))
        self._tier_blocks[tier] += len(key)
        return node

    def _split(self, node: Node, cut: int) -> Node:
        """Moves node.key[:cut] into a new parent and returns it; ``node`` keeps the tail (and
        its locks). An anchored segment's anchor moves to the new head."""
        parent = node.parent
        if parent is None or not 0 < cut < len(node.key):
            raise RuntimeError(f"split of node {node.uid} at {cut} is invalid")
        head = Node(self._next_uid, node.created_at, node.tier)
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

    def _reroot_children(self, node: Node) -> None:
        """Re-roots the children of an eviction victim (all of other tiers) before its last
        block goes; none counted in its locks, so no lock count changes."""
        for child in list(node.children.values()):
            self._reroot(child, node.key[-1])
        node.children.clear()

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
        self._tier_blocks[node.tier] -= len(node.key)
        node.alive = False
        node.parent = None
        self._queues[node.tier].discard(node)

    def _add_lock_ref(self, node: Node, delta: int) -> None:
        """Adds ``delta`` to the lock count of ``node`` and its same-tier ancestors, root
        excluded."""
        tier = node.tier
        walk: Node | None = node
        while walk is not None and walk is not self.root and walk.tier == tier:
            walk.lock_ref += delta
            walk = walk.parent

    def _touch_path(self, node: Node) -> None:
        """Stamps ``node`` and its same-tier ancestors with the current clock and requeues
        ``node``."""
        tier = node.tier
        walk: Node | None = node
        while walk is not None and walk is not self.root and walk.tier == tier:
            walk.last_access = self._clock
            walk = walk.parent
        self._refresh(node)

    # ---- eviction queues, events ----
    def _is_evictable(self, node: Node) -> bool:
        if not node.alive or node.lock_ref or node is self.root:
            return False
        tier = node.tier
        for child in node.children.values():  # noqa: SIM110 (a loop: no generator per call)
            if child.tier == tier:
                return False
        return True

    def _refresh(self, node: Node) -> None:
        if self._is_evictable(node):
            self._queues[node.tier].push(node)

    def _emit(self, tier: TierName, event: RadixEvent) -> None:
        if self.listener is not None:
            self.listener(event)
        if self.tier_listener is not None:
            self.tier_listener(tier, event)

    # ---- integrity ----
    def check_integrity(self) -> None:
        """RuntimeError unless links, block counts (per tier too), lock counts, anchors and
        the eviction queues are consistent (each tier's candidates are exactly its unlocked
        nodes without a child of their tier)."""
        seen = dict.fromkeys(TIERS, 0)
        direct_total = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            direct_total += node.direct_locks
            child_locks = 0
            for first, child in node.children.items():
                self._check_node(node, first, child)
                if child.tier == node.tier:
                    child_locks += child.lock_ref
                seen[child.tier] += len(child.key)
                stack.append(child)
            if node is not self.root and (
                node.lock_ref != node.direct_locks + child_locks or node.direct_locks < 0
            ):
                raise RuntimeError(
                    f"node {node.uid}: lock_ref {node.lock_ref} != direct {node.direct_locks}"
                    f" + children {child_locks}"
                )
            if self._is_evictable(node) and self._queues[node.tier].live_entry(node) != (
                self._queues[node.tier].policy.priority(node)
            ):
                raise RuntimeError(f"node {node.uid}: evictable leaf missing from the queue")
        if self.root.lock_ref != direct_total:
            raise RuntimeError(f"root lock_ref {self.root.lock_ref} != {direct_total} locks")
        if sum(seen.values()) != len(self._where) or seen != self._tier_blocks:
            raise RuntimeError(
                f"tree holds {seen} blocks but the hash map holds {len(self._where)}"
                f" and the tier counts say {self._tier_blocks}"
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
