"""cuda_ipc's host-side parts: the block generation table in /dev/shm and the DeviceRef wire form
(the device copies themselves are checked on a GPU by tests/serving/test_kv_device.py)."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest

from backends.engine.block_manager import BlockManager
from kvbridge.transport.cuda_ipc import SHM_DIR, DeviceRef, GenerationTable, table_name


def test_generation_table_is_shared_and_unlinked_by_its_creator() -> None:
    name = table_name(os.getpgrp(), os.getpid())
    assert name.startswith(f"kvb-genpool-g{os.getpgrp()}-p{os.getpid()}-")
    owner = GenerationTable(name, 8, create=True)
    reader = GenerationTable(name, 8, create=False)
    manager = BlockManager(8, 4)
    manager.allocate(3)
    manager.use_generations(owner.array)
    assert list(reader.array) == [1, 1, 1, 0, 0, 0, 0, 0]
    manager.free([0])
    manager.allocate(6)  # 3..7 then 0 again: the FIFO list hands the freed block out last
    assert list(reader.array) == [2, 1, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match=f"num_blocks: table '{name}' holds 8, expected 9"):
        GenerationTable(name, 9, create=False)
    reader.close()
    assert os.path.exists(os.path.join(SHM_DIR, name))
    owner.close()
    owner.close()
    assert not os.path.exists(os.path.join(SHM_DIR, name))
    with pytest.raises(ValueError, match=f"name: no generation table '{name}' on this host"):
        GenerationTable(name, 8, create=False)
    with pytest.raises(ValueError, match="name: expected kvb-genpool-"):
        GenerationTable("../etc/passwd", 8, create=False)


def test_use_generations_checks_the_length() -> None:
    with pytest.raises(ValueError, match="generations: expected 4 entries, got 3"):
        BlockManager(4, 2).use_generations(np.zeros(3, np.int64))


def _ref() -> DeviceRef:
    layer = [[0, b"h" * 64, 1024, 0, b"rc", 0, b"ev", True], 0, [4, 16, 8], [128, 8, 1], "bfloat16"]
    return DeviceRef("GPU-1234", [layer, layer], "kvb-genpool-g1-ab", 4, (2, 0), (5, 7))


def test_device_ref_round_trip() -> None:
    ref = _ref()
    assert DeviceRef.from_bytes(ref.to_bytes()) == ref


@pytest.mark.parametrize(("field", "value", "message"), [
    ("table", "/dev/shm/x", r"device_ref.table: expected kvb-genpool-..., got '/dev/shm/x'"),
    ("layers", [], r"device_ref.layers: expected 1..4096 descriptors, got \[\]"),
    ("block_ids", [4], r"device_ref.block_ids: expected ints in \[0, 4\), got \[4\]"),
    ("block_gens", [1], r"device_ref.block_gens: expected 2 ints, got \[1\]"),
    ("table_blocks", 0, r"device_ref.table_blocks: expected an int >= 1, got 0"),
])
def test_device_ref_rejects_bad_fields(field: str, value: object, message: str) -> None:
    wire = msgpack.unpackb(_ref().to_bytes(), raw=False)
    wire[field] = value
    with pytest.raises(ValueError, match=message):
        DeviceRef.from_bytes(msgpack.packb(wire, use_bin_type=True))
    with pytest.raises(ValueError, match="device_ref: undecodable"):
        DeviceRef.from_bytes(b"\xc1")
    with pytest.raises(ValueError, match="device_ref: expected a map with"):
        DeviceRef.from_bytes(msgpack.packb([1]))
