"""HostBlockPool (shared memory, attach from a handle) and SlotAllocator."""

from __future__ import annotations

import multiprocessing as mp
import os
import random

import numpy as np
import pytest

from kvbridge.pool import (
    SHM_DIR,
    DeviceBlockPool,
    HostBlockPool,
    PoolHandle,
    PoolLayout,
    SlotAllocator,
    cuda_available,
)

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


def test_allocator_against_oracle() -> None:
    rng = random.Random(0)
    alloc = SlotAllocator(16)
    refs: dict[int, int] = {}
    for _ in range(500):
        op = rng.choice(["alloc", "pin", "free"])
        if op == "alloc":
            n = rng.randint(0, 5)
            got = alloc.allocate(n)
            if n > 16 - len(refs):
                assert got is None
            else:
                assert got is not None and len(got) == n and not set(got) & set(refs)
                refs.update(dict.fromkeys(got, 1))
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


@pytest.mark.skipif(not cuda_available(), reason="CUDA is not available")
def test_device_pool() -> None:
    pool = DeviceBlockPool(LAYOUT)
    assert tuple(pool.layer(0).shape) == (5, 16)
    pool.close()


@pytest.mark.skipif(cuda_available(), reason="checks the error without CUDA")
def test_device_pool_needs_cuda() -> None:
    with pytest.raises(RuntimeError, match="DeviceBlockPool needs CUDA"):
        DeviceBlockPool(LAYOUT)
