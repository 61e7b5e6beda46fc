"""Radix index: exact behaviour, eviction order, and a randomized oracle comparison."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbridge.eviction import FIFOPolicy, make_policy
from kvbridge.hashing import BlockHash, hash_blocks
from kvbridge.radix import (
    BlockRemoved,
    BlockStored,
    Chain,
    EvictedBlock,
    Node,
    RadixEvent,
    RadixTree,
)


def chain(*tokens: int) -> list[BlockHash]:
    """One block per token: chain(1, 2) is the hashes of blocks [1], [2]."""
    return hash_blocks(list(tokens), 1)


A = chain(1, 2, 3, 4)
B = chain(1, 2, 7, 8)
C = chain(5, 6)


def names(hashes: Sequence[BlockHash]) -> list[str]:
    table = {h: f"a{i}" for i, h in enumerate(A)} | {h: f"c{i}" for i, h in enumerate(C)}
    table |= {h: f"b{i}" for i, h in enumerate(B) if h not in table}
    return [table[h] for h in hashes]


def evicted_names(out: list[EvictedBlock]) -> list[str]:
    return names([e.hash for e in out])


def test_match_prefix_is_pure_and_exact() -> None:
    tree = RadixTree()
    assert tree.insert(A, [10, 11, 12, 13]) == 4
    assert tree.insert(B, [10, 11, 22, 23]) == 2
    m = tree.match_prefix(B + chain(9))
    assert (m.num_blocks, m.values, m.last_node_blocks) == (4, [10, 11, 22, 23], 2)
    m = tree.match_prefix(A[:3])
    assert (m.num_blocks, m.values, m.last_node_blocks) == (3, [10, 11, 12], 1)
    assert tree.match_prefix(C).num_blocks == 0
    before = [(n.uid, n.last_access) for n in _nodes(tree)]
    tree.match_prefix(A)
    assert [(n.uid, n.last_access) for n in _nodes(tree)] == before
    tree.check_integrity()


def test_existing_blocks_keep_their_values() -> None:
    tree = RadixTree()
    tree.insert(A[:2], [1, 2])
    assert tree.insert(A, [9, 9, 3, 4]) == 2
    assert tree.match_prefix(A).values == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="values: expected 4 values, got 1"):
        tree.insert(A, [1])


def test_lru_eviction_order_is_exact() -> None:
    tree = RadixTree()
    tree.insert(A, [10, 11, 12, 13])  # clock 1
    tree.insert(B, [10, 11, 22, 23])  # clock 2
    tree.insert(C, [30, 31])  # clock 3
    tree.touch(tree.match_prefix(A).last_node)  # A's leaf is now the most recent
    assert evicted_names(tree.evict(1)) == ["b3"]
    assert evicted_names(tree.evict(2)) == ["b2", "c1"]
    assert evicted_names(tree.evict(10)) == ["c0", "a3", "a2", "a1", "a0"]
    assert tree.num_blocks == 0
    tree.check_integrity()


def test_evicted_blocks_carry_values_and_parents() -> None:
    tree = RadixTree()
    tree.insert(A[:2], [10, 11])
    assert tree.evict(5) == [EvictedBlock(A[1], 11, A[0]), EvictedBlock(A[0], 10, None)]


def test_locks_protect_the_path_and_count_up_to_the_root() -> None:
    tree = RadixTree()
    tree.insert(A, [10, 11, 12, 13])
    tree.insert(B, [10, 11, 22, 23])
    node = tree.split_at(tree.match_prefix(A[:3]))
    tree.lock(node)
    tree.check_integrity()
    assert evicted_names(tree.evict(10)) == ["a3", "b3", "b2"]
    assert tree.match_prefix(A).num_blocks == 3
    tree.unlock(node)
    assert evicted_names(tree.evict(10)) == ["a2", "a1", "a0"]
    with pytest.raises(ValueError, match=f"unlock: node {node.uid} was removed from the index"):
        tree.unlock(node)
    tree.check_integrity()


def test_unlock_without_lock_is_an_error() -> None:
    tree = RadixTree()
    tree.insert(A, [1, 2, 3, 4])
    node = tree.match_prefix(A).last_node
    with pytest.raises(ValueError, match=f"unlock: node {node.uid} holds no lock"):
        tree.unlock(node)


def test_events_report_new_runs_and_removals() -> None:
    events: list[RadixEvent] = []
    tree = RadixTree(listener=events.append)
    tree.insert(A, [1, 2, 3, 4])
    tree.insert(B, [1, 2, 5, 6])
    tree.evict(3)
    assert events == [
        BlockStored(tuple(A), None),
        BlockStored(tuple(B[2:]), A[1]),
        BlockRemoved(tuple(A[2:])),
        BlockRemoved(tuple(B[3:])),
    ]


def test_anchored_segment_is_adopted_when_its_parent_arrives() -> None:
    tree = RadixTree()
    assert tree.insert(A[2:], [12, 13], parent_hash=A[1]) == 2
    assert tree.match_prefix(A).num_blocks == 0
    assert tree.match_prefix(A, start=2).values == [12, 13]
    tree.check_integrity()
    tree.insert(A[:2], [10, 11])
    assert tree.match_prefix(A).values == [10, 11, 12, 13]
    tree.check_integrity()
    assert evicted_names(tree.evict(1)) == ["a3"]


def test_insert_through_an_anchored_segment_splices_it() -> None:
    tree = RadixTree()
    tree.insert(A[2:3], [12], parent_hash=A[1])
    assert tree.insert(A, [10, 11, 99, 13]) == 3
    assert tree.match_prefix(A).values == [10, 11, 12, 13]
    tree.check_integrity()


def test_detach_removes_a_prefix_and_reroots_the_rest() -> None:
    events: list[RadixEvent] = []
    tree = RadixTree(listener=events.append)
    tree.insert(A, [10, 11, 12, 13])
    tree.insert(B, [10, 11, 22, 23])
    assert tree.detach(A[:3]) == [10, 11, 12]
    assert events[-1] == BlockRemoved(tuple(A[:3]))
    assert tree.match_prefix(A).num_blocks == 0
    assert tree.match_prefix(A, start=3).values == [13]
    assert tree.match_prefix(B, start=2).values == [22, 23]
    tree.check_integrity()
    tree.insert(A[:2], [40, 41])  # B's segment re-attaches under a1; A's a3 waits for a2
    assert tree.match_prefix(B).values == [40, 41, 22, 23]
    tree.check_integrity()
    with pytest.raises(ValueError, match="detach: only 0 of 2 blocks are indexed here"):
        tree.detach(C)


def test_locked_segment_keeps_its_lock_across_detach_and_adoption() -> None:
    tree = RadixTree()
    tree.insert(A, [10, 11, 12, 13])
    node = tree.split_at(tree.match_prefix(A))
    tree.lock(node)
    assert tree.detach(A[:2]) == [10, 11]
    tree.check_integrity()
    tree.insert(A[:2], [20, 21])
    tree.check_integrity()
    assert tree.root.lock_ref == 1
    assert evicted_names(tree.evict(10)) == []
    tree.unlock(node)
    assert evicted_names(tree.evict(10)) == ["a3", "a2", "a1", "a0"]


def test_anchor_inside_a_new_run_splits_it_and_keeps_the_segment_lock() -> None:
    events: list[RadixEvent] = []
    tree = RadixTree(listener=events.append)
    tree.insert(B[2:], [22, 23], parent_hash=B[1])
    segment = tree.split_at(tree.match_prefix(B, start=2))
    tree.lock(segment)
    assert tree.insert(A, [10, 11, 12, 13]) == 4  # the run a0..a3 is split after a1
    assert events == [BlockStored(tuple(B[2:]), B[1]), BlockStored(tuple(A), None)]
    assert tree.match_prefix(B).values == [10, 11, 22, 23]
    assert tree.root.lock_ref == 1
    tree.check_integrity()
    assert evicted_names(tree.evict(10)) == ["a3", "a2"]
    tree.unlock(segment)
    assert evicted_names(tree.evict(10)) == ["b3", "b2", "a1", "a0"]
    tree.check_integrity()


def test_insert_batch_and_fifo_policy() -> None:
    tree = RadixTree(policy=FIFOPolicy())
    assert tree.insert_batch([Chain(A, [1, 2, 3, 4]), Chain(C, [5, 6])]) == 6
    tree.touch(tree.match_prefix(A).last_node)
    assert evicted_names(tree.evict(1)) == ["a3"]
    with pytest.raises(ValueError, match="eviction policy must be 'lru' or 'fifo', got 'x'"):
        make_policy("x")


def _nodes(tree: RadixTree) -> list[Node]:
    out, stack = [], [tree.root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return sorted(out, key=lambda n: n.uid)


# ---- randomized comparison against a naive oracle ----


class Oracle:
    """Blocks as a dict hash -> (value, parent hash); locks as the hashes they end at."""

    def __init__(self) -> None:
        self.blocks: dict[BlockHash, tuple[int, BlockHash | None]] = {}
        self.locks: list[tuple[Node, BlockHash]] = []

    def insert(self, hashes: list[BlockHash], values: list[int], parent: BlockHash | None) -> int:
        new = 0
        for h, v in zip(hashes, values, strict=True):
            if h not in self.blocks:
                self.blocks[h] = (v, parent)
                new += 1
            parent = h
        return new

    def match(self, hashes: list[BlockHash]) -> list[int]:
        out = []
        for h in hashes:
            if h not in self.blocks:
                break
            out.append(self.blocks[h][0])
        return out

    def locked(self) -> set[BlockHash]:
        marked: set[BlockHash] = set()
        for _, h in self.locks:
            walk: BlockHash | None = h
            while walk is not None and walk in self.blocks and walk not in marked:
                marked.add(walk)
                walk = self.blocks[walk][1]
        return marked

    def remove(self, block: EvictedBlock) -> None:
        if block.hash not in self.blocks or block.hash in self.locked():
            raise AssertionError("evicted a missing or locked block")
        if any(p == block.hash for _, p in self.blocks.values()):
            raise AssertionError("evicted a block that still has a child")
        assert self.blocks[block.hash] == (block.value, block.parent_hash)
        del self.blocks[block.hash]


TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=6)
OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "suffix", "match", "lock", "unlock", "evict", "touch", "detach"]),
              TOKENS, st.integers(0, 6)),
    max_size=40,
)  # fmt: skip


def _detach(tree: RadixTree, oracle: Oracle, hashes: list[BlockHash]) -> None:
    if len(oracle.match(hashes)) < len(hashes):
        with pytest.raises(ValueError, match="detach: only"):
            tree.detach(hashes)
    elif any(h in hashes for _, h in oracle.locks):
        with pytest.raises(ValueError, match="detach: a block on the path is locked"):
            tree.detach(hashes)
    else:
        assert tree.detach(hashes) == oracle.match(hashes)
        for h in hashes:
            del oracle.blocks[h]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_radix_against_oracle(ops: list[tuple[str, list[int], int]]) -> None:
    tree, oracle = RadixTree(), Oracle()
    for op, tokens, k in ops:
        hashes = hash_blocks(tokens, 1)
        values = [t * 100 + i for i, t in enumerate(tokens)]
        if op == "insert":
            assert tree.insert(hashes, values) == oracle.insert(hashes, values, None)
        elif op == "suffix":
            cut = min(k, len(hashes) - 1)
            parent = hashes[cut - 1] if cut else None
            got = tree.insert(hashes[cut:], values[cut:], parent)
            assert got == oracle.insert(hashes[cut:], values[cut:], parent)
        elif op == "match":
            assert tree.match_prefix(hashes).values == oracle.match(hashes)
        elif op == "touch":
            tree.touch(tree.match_prefix(hashes).last_node)
        elif op == "lock":
            m = tree.match_prefix(hashes[: max(k, 1)])
            if m.num_blocks:
                node = tree.split_at(m)
                tree.lock(node)
                oracle.locks.append((node, hashes[m.num_blocks - 1]))
        elif op == "unlock" and oracle.locks:
            node, _ = oracle.locks.pop(k % len(oracle.locks))
            tree.unlock(node)
        elif op == "detach":
            _detach(tree, oracle, hashes[: max(k, 1)])
        elif op == "evict":
            unlocked = len(oracle.blocks) - len(oracle.locked())
            out = tree.evict(k)
            assert len(out) == min(k, unlocked)
            for block in out:
                oracle.remove(block)
        tree.check_integrity()
        assert tree.num_blocks == len(oracle.blocks)
        assert all(tree.value_of(h) == v for h, (v, _) in oracle.blocks.items())


def test_a_block_under_another_parent_is_rejected_before_any_change() -> None:
    tree = RadixTree()
    tree.insert(A, [10, 11, 12, 13])
    bogus = [C[0], A[2]]  # A[2]'s stored parent is A[1], not C[0]
    with pytest.raises(
        ValueError, match=r"hashes\[1\] is already indexed under a different parent"
    ):
        tree.insert(bogus, [1, 2])
    assert C[0] not in tree
    assert tree.num_blocks == 4
    tree.check_integrity()


# ---- tiers: a property of a node, each tier acting as a tree of its own ----


def test_tiers_partition_matching_locks_access_and_eviction() -> None:
    events: list[tuple[str, RadixEvent]] = []
    tree = RadixTree(tier_listener=lambda tier, event: events.append((tier, event)))
    tree.insert(A[:2], [10, 11])
    tree.insert(A[2:], [12, 13], A[1], "hot")
    tree.insert(B[2:], [22, 23], B[1], "cold")
    assert events == [
        ("active", BlockStored(tuple(A[:2]), None)),
        ("hot", BlockStored(tuple(A[2:]), A[1])),
        ("cold", BlockStored(tuple(B[2:]), B[1])),
    ]
    runs = [(r.tier, r.start, r.end, r.values) for r in tree.match_tiers(A + C)]
    assert runs == [("active", 0, 2, [10, 11]), ("hot", 2, 4, [12, 13])]
    assert tree.match_prefix(B).values == [10, 11, 22, 23]
    assert [tree.num_blocks_in(t) for t in ("active", "hot", "cold")] == [2, 2, 2]
    assert (tree.tier_of(A[3]), tree.tier_of(B[2]), tree.tier_of(C[0])) == ("hot", "cold", None)
    assert sorted(names([h for h, _ in tree.blocks("hot")])) == ["a2", "a3"]
    active = tree.split_at(tree.match_prefix(A[:2]))
    stamp = active.last_access
    tree.touch(tree.match_prefix(A).last_node)  # stamps hot a2..a3 only
    assert active.last_access == stamp
    tree.lock(active)
    assert (active.lock_ref, tree.match_prefix(A).last_node.lock_ref) == (1, 0)
    assert evicted_names(tree.evict(10, "active")) == []
    assert evicted_names(tree.evict(1, "hot")) == ["a3"]  # a run below a lock of another tier
    assert evicted_names(tree.evict(10, "cold")) == ["b3", "b2"]
    assert events[-2:] == [("hot", BlockRemoved((A[3],))), ("cold", BlockRemoved(tuple(B[2:])))]
    tree.check_integrity()
    tree.unlock(active)
    assert evicted_names(tree.evict(10, "hot")) == ["a2"]
    assert evicted_names(tree.evict(10)) == ["a1", "a0"]
    assert [tree.num_blocks_in(t) for t in ("active", "hot", "cold")] == [0, 0, 0]
    tree.check_integrity()


def test_evicting_a_block_reroots_its_children_of_other_tiers() -> None:
    tree = RadixTree()
    tree.insert(A[:2], [10, 11])
    tree.insert(A[2:], [12, 13], A[1], "cold")
    segment = tree.split_at(tree.match_prefix(A))
    tree.lock(segment)  # a cold lock does not hold the active a1
    assert evicted_names(tree.evict(1)) == ["a1"]
    assert tree.match_prefix(A).values == [10]
    assert tree.match_prefix(A, start=2).values == [12, 13]
    assert tree.root.lock_ref == 1
    tree.check_integrity()
    assert tree.insert(A[1:2], [21], A[0], "hot") == 1  # the cold segment is adopted again
    runs = [(r.tier, r.values) for r in tree.match_tiers(A)]
    assert runs == [("active", [10]), ("hot", [21]), ("cold", [12, 13])]
    tree.check_integrity()
    tree.unlock(segment)
    assert evicted_names(tree.evict(10, "cold")) == ["a3", "a2"]
    tree.check_integrity()


def test_detach_takes_a_run_out_below_another_tier() -> None:
    events: list[tuple[str, RadixEvent]] = []
    tree = RadixTree(tier_listener=lambda tier, event: events.append((tier, event)))
    tree.insert(A[:2], [10, 11])
    tree.insert(A[2:], [12, 13], A[1], "hot")
    tree.insert(B[2:], [22, 23], B[1], "hot")
    assert tree.detach(A[:3], 1) == [11, 12]  # a1 (active) and a2 (hot): one event per tier
    assert events[-2:] == [("active", BlockRemoved((A[1],))), ("hot", BlockRemoved((A[2],)))]
    assert tree.match_prefix(A).values == [10]
    assert tree.match_prefix(A, start=3).values == [13]
    assert tree.match_prefix(B, start=2).values == [22, 23]
    tree.check_integrity()
    assert tree.insert(A[1:3], [41, 42], A[0], "hot") == 2
    assert tree.match_prefix(A).values == [10, 41, 42, 13]
    assert tree.match_prefix(B).values == [10, 41, 22, 23]
    tree.check_integrity()


class TieredOracle:
    """Blocks as hash -> (value, parent hash, tier); a lock marks its block and the same-tier
    blocks above it."""

    def __init__(self) -> None:
        self.blocks: dict[BlockHash, tuple[int, BlockHash | None, str]] = {}
        self.locks: list[tuple[Node, BlockHash]] = []

    def insert(
        self, hashes: list[BlockHash], values: list[int], parent: BlockHash | None, tier: str
    ) -> int:
        new = 0
        for h, v in zip(hashes, values, strict=True):
            if h not in self.blocks:
                self.blocks[h] = (v, parent, tier)
                new += 1
            parent = h
        return new

    def locked(self) -> set[BlockHash]:
        marked: set[BlockHash] = set()
        for _, h in self.locks:
            tier = self.blocks[h][2]
            walk: BlockHash | None = h
            while walk in self.blocks and self.blocks[walk][2] == tier and walk not in marked:
                marked.add(walk)
                walk = self.blocks[walk][1]
        return marked

    def remove(self, block: EvictedBlock, tier: str) -> None:
        value, parent, held_in = self.blocks[block.hash]
        assert held_in == tier and block.hash not in self.locked()
        assert not any(p == block.hash and t == tier for _, p, t in self.blocks.values())
        assert (value, parent) == (block.value, block.parent_hash)
        del self.blocks[block.hash]


TIERED_OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "suffix", "match", "lock", "unlock", "evict", "touch"]),
              TOKENS, st.integers(0, 6), st.sampled_from(["active", "hot", "cold"])),
    max_size=40,
)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TIERED_OPS)
def test_tiered_radix_against_oracle(ops: list[tuple[str, list[int], int, str]]) -> None:
    tree, oracle = RadixTree(), TieredOracle()
    for op, tokens, k, tier in ops:
        hashes = hash_blocks(tokens, 1)
        values = [t * 100 + i for i, t in enumerate(tokens)]
        if op in ("insert", "suffix"):
            cut = min(k, len(hashes) - 1) if op == "suffix" else 0
            parent = hashes[cut - 1] if cut else None
            got = tree.insert(hashes[cut:], values[cut:], parent, tier)  # type: ignore[arg-type]
            assert got == oracle.insert(hashes[cut:], values[cut:], parent, tier)
        elif op == "match":
            runs = tree.match_tiers(hashes)
            got = [(r.tier, v) for r in runs for v in r.values]
            want = []
            for h in hashes:
                if h not in oracle.blocks:
                    break
                want.append((oracle.blocks[h][2], oracle.blocks[h][0]))
            assert got == want
        elif op == "touch":
            tree.touch(tree.match_prefix(hashes).last_node)
        elif op == "lock":
            m = tree.match_prefix(hashes[: max(k, 1)])
            if m.num_blocks:
                node = tree.split_at(m)
                tree.lock(node)
                oracle.locks.append((node, hashes[m.num_blocks - 1]))
        elif op == "unlock" and oracle.locks:
            node, _ = oracle.locks.pop(k % len(oracle.locks))
            tree.unlock(node)
        elif op == "evict":
            locked = oracle.locked()
            evictable = sum(1 for h, b in oracle.blocks.items() if b[2] == tier and h not in locked)
            out = tree.evict(k, tier)  # type: ignore[arg-type]
            assert len(out) == min(k, evictable)
            for block in out:
                oracle.remove(block, tier)
        tree.check_integrity()
        assert tree.num_blocks == len(oracle.blocks)
        assert all(tree.value_of(h) == v for h, (v, _, _) in oracle.blocks.items())
        assert all(tree.tier_of(h) == t for h, (_, _, t) in oracle.blocks.items())
