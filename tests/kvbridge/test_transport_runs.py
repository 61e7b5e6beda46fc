"""Run pairing and copies of kvbridge/transport/base.py, and the send handles' shared helpers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import SlotPins, check_next_layer
from kvbridge.transport.nixl_agent import pair_runs
from kvbridge.transport.regions import Overlap, PoolRegion, copy_layers, copy_runs, overlaps


def test_overlaps_exact_pieces() -> None:
    assert overlaps([3, 5], [4, 4], "m") == [Overlap(0, 0, 0, 0, 3), Overlap(1, 0, 0, 3, 1), Overlap(1, 1, 1, 0, 4)]
    assert overlaps([8], [2, 6], "m") == [Overlap(0, 0, 0, 0, 2), Overlap(0, 2, 1, 0, 6)]


def test_overlaps_mismatch_raises_the_given_message() -> None:
    with pytest.raises(ValueError, match=r"^dst: sizes differ$"):
        overlaps([3, 5], [4, 5], "dst: sizes differ")


def test_pair_runs_maps_pieces_to_addresses() -> None:
    assert pair_runs([(100, 3), (200, 5)], [(1000, 8)]) == [(100, 1000, 3), (200, 1003, 5)]
    with pytest.raises(ValueError, match=r"^dest: source and destination layers differ in size$"):
        pair_runs([(100, 3)], [(1000, 4)])


def _split(data: np.ndarray, rng: random.Random) -> list[np.ndarray]:
    cuts = sorted(rng.sample(range(1, data.nbytes), rng.randint(0, 5)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, data.nbytes], strict=True)]


def test_copy_runs_matches_a_flat_copy_for_random_splits() -> None:
    rng = random.Random(7)
    for _ in range(50):
        nbytes = rng.randint(8, 64)
        src = np.frombuffer(rng.randbytes(nbytes), dtype=np.uint8)
        dst = np.zeros(nbytes, dtype=np.uint8)
        copy_runs(_split(src, rng), _split(dst, rng))
        assert dst.tobytes() == src.tobytes()


def test_copy_runs_mismatch_copies_nothing() -> None:
    src, dst = np.arange(8, dtype=np.uint8), np.zeros(9, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"^dst: source and destination layers differ in size$"):
        copy_runs([src[:4], src[4:]], [dst[:5], dst[5:]])
    assert dst.tolist() == [0] * 9


def test_copy_layers_between_pool_regions_matches_an_oracle() -> None:
    src = np.arange(3 * 8 * 2, dtype=np.uint8).reshape(3, 8, 2)
    dst = np.zeros((3, 6, 2), dtype=np.uint8)
    src_slots, dst_slots = [1, 2, 5, 6, 7], [0, 4, 5, 1, 2]
    copy_layers(PoolRegion(src, src_slots), PoolRegion(dst, dst_slots), 1, 3)
    expected = np.zeros_like(dst)
    expected[1:3, dst_slots] = src[1:3, src_slots]
    assert dst.tolist() == expected.tolist()
    with pytest.raises(ValueError, match=r"^dst: source and destination regions differ in size$"):
        copy_layers(PoolRegion(src, [1, 2]), PoolRegion(dst, [0]), 0, 1)


def test_check_next_layer() -> None:
    check_next_layer(2, 2, 4)
    with pytest.raises(ValueError, match=r"^layer: expected to publish layer 2 next, got 3$"):
        check_next_layer(3, 2, 4)
    with pytest.raises(ValueError, match=r"^layer: expected to publish layer 4 next, got 4$"):
        check_next_layer(4, 4, 4)


def test_slot_pins_pin_until_release_once() -> None:
    slots = SlotAllocator(4)
    held = slots.allocate(2)
    if held is None:
        raise RuntimeError("a fresh 4-slot allocator refused 2 slots")
    pins = SlotPins(slots, tuple(held))
    assert [slots.refcount(s) for s in held] == [2, 2]
    pins.release()
    pins.release()
    assert [slots.refcount(s) for s in held] == [1, 1]
    SlotPins(None, (0, 1)).release()
