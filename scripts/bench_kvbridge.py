"""kvbridge benchmarks: `--section radix` (index ops/s) and `--section transfer` (GB/s).

Transfer: a producer process publishes a 4-layer payload from its shared-memory pool; this
process receives it into its own pool over shm and over tcp (loopback, crc32 on) and times
start_recv -> wait. Beside each size: this machine's memcpy GB/s (numpy copy of the same
size, the physical limit) and the ratio. Prints a table; ``--json FILE`` writes the rows.
The radix section is owned by kvindex (see docs/contracts.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbridge.hashing import BlockHash  # noqa: E402
from kvbridge.pool import HostBlockPool, PoolLayout  # noqa: E402
from kvbridge.transport.base import PoolRegion, TransferSpec  # noqa: E402
from kvbridge.transport.registry import get_transport  # noqa: E402
from kvbridge.transport.tcp import TcpTransport  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
DEFAULT_SIZES = [64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB]
NUM_LAYERS = 4


@dataclass(frozen=True, slots=True)
class TransferRow:
    transport: str
    size_bytes: int
    gbps: float
    memcpy_gbps: float
    ratio: float


def _layout(size_bytes: int) -> PoolLayout:
    layer_nbytes = size_bytes // NUM_LAYERS
    block_bytes = min(layer_nbytes, 64 * KIB)
    return PoolLayout(NUM_LAYERS, layer_nbytes // block_bytes, block_bytes)


def _producer(name: str, conn: Connection) -> None:
    """Serves transfer requests (size, transfer_id) until it receives None."""
    transport = get_transport(name)()
    pools: dict[int, HostBlockPool] = {}
    while (request := conn.recv()) is not None:
        size, transfer_id = request
        if size not in pools:
            pools[size] = HostBlockPool.create(_layout(size))
            pools[size].array[:] = np.random.default_rng(size).integers(0, 256, pools[size].array.shape, np.uint8)
        pool = pools[size]
        slots = tuple(range(pool.layout.num_slots))
        nbytes = len(slots) * pool.layout.block_bytes
        if isinstance(transport, TcpTransport):
            spec = transport.spec_for(transfer_id, NUM_LAYERS, nbytes, slots)
        else:
            spec = TransferSpec(transfer_id, NUM_LAYERS, nbytes, pool=pool.handle, source_slots=slots)
        send = transport.start_send(spec, PoolRegion(pool.array, slots))
        for layer in range(NUM_LAYERS):
            send.publish_layer(layer)
        conn.send(spec)
        send.wait(time.monotonic() + 120)
        send.close()
        conn.send("done")
    transport.close()
    for pool in pools.values():
        pool.close()


def memcpy_gbps(size_bytes: int, reps: int) -> float:
    src = np.random.default_rng(0).integers(0, 256, size_bytes, np.uint8)
    dst = np.zeros_like(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return size_bytes / statistics.median(times) / 1e9


def _reps(size_bytes: int) -> int:
    return max(5, min(50, (256 * MIB) // size_bytes))


def transfer_gbps(name: str, sizes: list[int]) -> dict[int, float]:
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_producer, args=(name, child), daemon=True)
    proc.start()
    transport = get_transport(name)()
    out: dict[int, float] = {}
    try:
        for size in sizes:
            with HostBlockPool.create(_layout(size)) as dest:
                region = PoolRegion(dest.array, tuple(range(dest.layout.num_slots)))
                times = []
                for rep in range(_reps(size) + 1):
                    conn.send((size, f"bench-{name}-{size}-{rep}"))
                    spec = conn.recv()
                    start = time.perf_counter()
                    recv = transport.start_recv(spec, region)
                    recv.wait(time.monotonic() + 120)
                    elapsed = time.perf_counter() - start
                    recv.close()
                    if conn.recv() != "done":
                        raise RuntimeError("producer failed")
                    if rep:  # rep 0 warms up (pool creation, page faults)
                        times.append(elapsed)
                del region, recv
                out[size] = size / statistics.median(times) / 1e9
    finally:
        conn.send(None)
        proc.join(60)
        transport.close()
    return out


def transfer_section(sizes: list[int]) -> list[TransferRow]:
    baseline = {size: memcpy_gbps(size, _reps(size)) for size in sizes}
    rows = []
    for name in ("shm", "tcp"):
        for size, gbps in transfer_gbps(name, sizes).items():
            rows.append(TransferRow(name, size, gbps, baseline[size], gbps / baseline[size]))
    return rows


def print_transfer_table(rows: list[TransferRow]) -> None:
    print(f"{'transport':<10}{'size':>10}{'GB/s':>10}{'memcpy GB/s':>14}{'ratio':>8}")
    for row in rows:
        size = f"{row.size_bytes // MIB} MiB" if row.size_bytes >= MIB else f"{row.size_bytes // KIB} KiB"
        print(f"{row.transport:<10}{size:>10}{row.gbps:>10.2f}{row.memcpy_gbps:>14.2f}{row.ratio:>8.2f}")


RADIX_SIZES = (10_000, 100_000, 1_000_000)
RADIX_CHAIN_BLOCKS, RADIX_SHARED_BLOCKS, RADIX_ROOTS = 64, 16, 16


@dataclass(frozen=True, slots=True)
class RadixRow:
    cached_blocks: int
    op: str
    ops_per_s: float
    blocks_per_s: float


def _radix_chain(
    rng: np.random.Generator, roots: list[list[BlockHash]], root: int
) -> list[BlockHash]:
    """A 64-block chain: one of 16 shared 16-block prefixes, then 48 unique random hashes."""
    fresh = RADIX_CHAIN_BLOCKS - RADIX_SHARED_BLOCKS
    raw = rng.bytes(32 * fresh)
    return roots[root] + [BlockHash(raw[i * 32 : (i + 1) * 32]) for i in range(fresh)]


def _radix_timed(
    op: str, cached: int, blocks_per_op: int, fn: Callable[..., object], args: list[tuple]
) -> RadixRow:
    start = time.perf_counter()
    for arg in args:
        fn(*arg)
    elapsed = time.perf_counter() - start
    return RadixRow(cached, op, len(args) / elapsed, len(args) * blocks_per_op / elapsed)


def radix_rows(cached_blocks: int, num_ops: int = 5000) -> list[RadixRow]:
    """match_prefix / insert / evict rates on a tree holding ``cached_blocks`` blocks."""
    from kvbridge.radix import RadixTree

    rng = np.random.default_rng(cached_blocks)
    roots = [
        [BlockHash(rng.bytes(32)) for _ in range(RADIX_SHARED_BLOCKS)] for _ in range(RADIX_ROOTS)
    ]
    tree = RadixTree()
    chains: list[list[BlockHash]] = []
    values = list(range(RADIX_CHAIN_BLOCKS))
    while tree.num_blocks < cached_blocks:
        chain = _radix_chain(rng, roots, len(chains) % RADIX_ROOTS)
        tree.insert(chain, values)
        chains.append(chain)
    picks = rng.integers(0, len(chains), num_ops)
    queries = [(chains[i] + roots[0][:8],) for i in picks]  # full hit, then a miss
    new = [(_radix_chain(rng, roots, i % RADIX_ROOTS), values) for i in range(num_ops)]
    total = RADIX_CHAIN_BLOCKS
    rows = [_radix_timed("match_prefix", cached_blocks, total, tree.match_prefix, queries)]
    rows.append(_radix_timed("insert", cached_blocks, total, tree.insert, new))
    rows.append(_radix_timed("evict(64)", cached_blocks, 64, tree.evict, [(64,)] * num_ops))
    tree.check_integrity()
    return rows


def _hash_row(num_ops: int = 500, block_size: int = 16) -> RadixRow:
    """hash_blocks over 64-block token sequences (the cost a prompt pays before a lookup)."""
    from kvbridge.hashing import hash_blocks

    rng = np.random.default_rng(0)
    seqs = [(rng.integers(0, 32000, 64 * block_size).tolist(), block_size, "model") for _ in range(num_ops)]
    return _radix_timed("hash_blocks", 0, 64, hash_blocks, seqs)


def radix_section(sizes: tuple[int, ...] = RADIX_SIZES) -> list[dict[str, object]]:
    """Radix match/insert/evict ops/s at 10k, 100k and 1M cached blocks (64-block chains
    over 16 shared 16-block prefixes; match = a cached chain plus 8 missing blocks)."""
    rows = [row for size in sizes for row in radix_rows(size)]
    rows.append(_hash_row())
    print(f"{'cached blocks':>14}{'op':>14}{'ops/s':>12}{'blocks/s':>14}")
    for row in rows:
        print(f"{row.cached_blocks:>14,}{row.op:>14}{row.ops_per_s:>12,.0f}{row.blocks_per_s:>14,.0f}")
    return [asdict(row) for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--section", choices=["all", "radix", "transfer"], default="all")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=DEFAULT_SIZES,
                        help="comma-separated transfer sizes in bytes (multiples of 4)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results: dict[str, object] = {}
    if args.section in ("all", "radix"):
        results["radix"] = radix_section()
    if args.section in ("all", "transfer"):
        rows = transfer_section(args.sizes)
        print_transfer_table(rows)
        results["transfer"] = [asdict(row) for row in rows]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
