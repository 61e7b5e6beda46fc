"""HostBlockPool (shared memory, attach from a handle) and SlotAllocator."""

from __future__ import annotations

import multiprocessing as mp
import os
import random

import numpy as np
import pytest

from kvbridge.errors import KVBridgeError, StaleSlots
from kvbridge.pool import (
    SHM_DIR,
    DeviceBlockPool,
    HostBlockPool,
    PoolHandle,
    PoolLayout,
    cuda_available,
)
from kvbridge.slots import SlotAllocator

LAYOUT = PoolLayout(num_layers=3, num_slots=5, block_bytes=16)


def _child_writes(handle: PoolHandle) -> None:
    with HostBlockPool.attach(handle) as pool:
        pool.block(2, 4)[:] = np.arange(16, dtype=np.uint8)


def test_layout_and_views_without_copies() -> None:
    with HostBlockPool.create(LAYOUT) as pool:
        assert pool.array.shape == (3, 5, 16)
        block = pool.block(1, 2)
        block[:] = 7
        assert np.shares_memory(block, pool.array)
        flat = pool.array.reshape(-1)
        assert flat[(1 * 5 + 2) * 16] == 7
        assert pool.layer(1).strides == (16, 1)
        del block, flat


def test_attach_from_another_process_and_unlink() -> None:
    pool = HostBlockPool.create(LAYOUT)
    proc = mp.get_context("spawn").Process(target=_child_writes, args=(pool.handle,))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert pool.block(2, 4).tolist() == list(range(16))
    name = pool.handle.name
    pool.close()
    assert not os.path.exists(os.path.join(SHM_DIR, name))
    with pytest.raises(ValueError, match=f"handle.name: no shared-memory pool '{name}' on this host"):
        HostBlockPool.attach(pool.handle)


def test_attach_rejects_wrong_layout_and_bad_index() -> None:
    with HostBlockPool.create(LAYOUT) as pool:
        wrong = PoolHandle(pool.handle.name, PoolLayout(3, 6, 16))
        with pytest.raises(ValueError, match=r"pool '.*' has 240 bytes, layout needs 288"):
            HostBlockPool.attach(wrong)
        with pytest.raises(ValueError, match=r"slot: 5 out of range \[0, 5\)"):
            pool.block(0, 5)
        with pytest.raises(ValueError, match=r"layer: 3 out of range \[0, 3\)"):
            pool.layer(3)
    with pytest.raises(ValueError, match=r"name: expected"):
        PoolHandle("../etc", LAYOUT)


def test_close_with_live_view_is_an_error() -> None:
    pool = HostBlockPool.create(LAYOUT)
    view = pool.block(0, 0)
    with pytest.raises(RuntimeError, match="closed while numpy views still reference it"):
        pool.close()
    assert not os.path.exists(os.path.join(SHM_DIR, pool.handle.name))
    del view


def test_allocator_refcounts_and_errors() -> None:
    alloc = SlotAllocator(4)
    assert alloc.allocate(3) == [0, 1, 2]
    assert alloc.allocate(2) is None
    alloc.pin([1])
    alloc.free([0, 1])
    assert alloc.num_free == 2
    assert alloc.refcount(1) == 1
    alloc.unpin([1])
    assert alloc.allocate(3) == [3, 0, 1]
    with pytest.raises(ValueError, match=r"ids: free of slot 9 out of range \[0, 4\)"):
        alloc.free([9])
    with pytest.raises(ValueError, match=r"ids: free of slot 2 which is not allocated \(refcount 1\)"):
        alloc.free([2, 2])
    assert alloc.refcount(2) == 1
    alloc.check_integrity()


def test_generations_bump_on_reallocation() -> None:
    alloc = SlotAllocator(3)
    assert alloc.generations([0, 1, 2]) == (0, 0, 0)
    assert alloc.allocate(2) == [0, 1]
    assert alloc.generations([0, 1, 2]) == (1, 1, 0)
    alloc.pin([1])
    alloc.free([0, 1])  # slot 1 stays allocated (pinned): same generation
    assert alloc.generations([1, 0]) == (1, 1)
    alloc.unpin([1])
    assert alloc.generations([0, 1]) == (1, 1)  # freeing does not bump; handing out again does
    assert alloc.allocate(3) == [2, 0, 1]
    assert alloc.generations([0, 1, 2]) == (2, 2, 1)
    with pytest.raises(ValueError, match=r"ids: generations of slot 3 out of range \[0, 3\)"):
        alloc.generations([0, 3])
    alloc.check_integrity()


def test_pin_with_stale_generation_raises_and_pins_nothing() -> None:
    alloc = SlotAllocator(4)
    slots = alloc.allocate(3)
    assert slots == [0, 1, 2]
    gens = alloc.generations(slots)
    assert gens == (1, 1, 1)
    alloc.pin(slots, gens)
    assert [alloc.refcount(s) for s in range(4)] == [2, 2, 2, 0]
    alloc.unpin(slots)
    alloc.free([1])
    assert alloc.allocate(2) == [3, 1]  # slot 1 now holds another sequence's blocks
    with pytest.raises(StaleSlots, match=r"^stale slot 1: expected generation 1, current generation 2$") as info:
        alloc.pin(slots, gens)
    assert isinstance(info.value, KVBridgeError)
    assert (info.value.slot, info.value.expected, info.value.current, info.value.allocated) == (1, 1, 2, True)
    assert [alloc.refcount(s) for s in range(4)] == [1, 1, 1, 1]
    alloc.free([2])
    with pytest.raises(StaleSlots, match=r"^stale slot 2: expected generation 1, current generation 1 \(free\)$"):
        alloc.pin([0, 2], (1, 1))  # freed, not yet handed out again: still stale
    assert [alloc.refcount(s) for s in range(4)] == [1, 1, 0, 1]
    with pytest.raises(ValueError, match=r"gens: expected 2 generations \(one per slot\), got 1"):
        alloc.pin([0, 1], (1,))
    with pytest.raises(ValueError, match=r"ids: pin of slot 7 out of range \[0, 4\)"):
        alloc.pin([0, 7], (1, 1))
    alloc.pin([0, 1], (1, 2))
    assert [alloc.refcount(s) for s in range(4)] == [2, 2, 0, 1]
    alloc.check_integrity()


def test_allocator_against_oracle() -> None:
    rng = random.Random(0)
    alloc = SlotAllocator(16)
    refs: dict[int, int] = {}
    gens = [0] * 16
    for _ in range(500):
        op = rng.choice(["alloc", "pin", "free", "pin_gen"])
        if op == "alloc":
            n = rng.randint(0, 5)
            got = alloc.allocate(n)
            if n > 16 - len(refs):
                assert got is None
            else:
                assert got is not None and len(got) == n and not set(got) & set(refs)
                refs.update(dict.fromkeys(got, 1))
                for slot in got:
                    gens[slot] += 1
        elif op == "pin_gen":
            slot = rng.randrange(16)
            expected = gens[slot] - rng.randint(0, 1)
            if slot in refs and expected == gens[slot]:
                alloc.pin([slot], (expected,))
                refs[slot] += 1
            else:
                with pytest.raises(StaleSlots, match=f"^stale slot {slot}: expected generation {expected}, "):
                    alloc.pin([slot], (expected,))
        elif refs:
            slot = rng.choice(sorted(refs))
            if op == "pin":
                alloc.pin([slot])
                refs[slot] += 1
            else:
                alloc.free([slot])
                refs[slot] -= 1
                if refs[slot] == 0:
                    del refs[slot]
        alloc.check_integrity()
        assert alloc.num_used == len(refs)
        assert all(alloc.refcount(s) == r for s, r in refs.items())
        assert alloc.generations(range(16)) == tuple(gens)


@pytest.mark.skipif(not cuda_available(), reason="CUDA is not available")
def test_device_pool() -> None:
    pool = DeviceBlockPool(LAYOUT)
    assert tuple(pool.layer(0).shape) == (5, 16)
    pool.close()


@pytest.mark.skipif(cuda_available(), reason="checks the error without CUDA")
def test_device_pool_needs_cuda() -> None:
    with pytest.raises(RuntimeError, match="DeviceBlockPool needs CUDA"):
        DeviceBlockPool(LAYOUT)
