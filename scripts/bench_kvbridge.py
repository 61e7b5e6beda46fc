"""kvbridge benchmarks: `--section radix` (index ops/s) and `--section transfer` (GB/s).

Transfer: a producer process holds a 4-layer payload in its shared-memory pool; this process
receives it into its own (pre-touched) pool over shm and tcp (loopback, xxh3_64 on), as a
published transfer and as a pull by handle from the producer's block server, and times
start_recv -> wait -> close (see TRANSFER_NOTES). Beside each: this machine's memcpy GB/s
(numpy copy of the same size, timed beside each rep; the physical limit) and the ratio.
Prints a table; ``--json FILE`` writes the rows.
The radix section is owned by kvindex (see docs/contracts.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
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
from kvbridge.slots import SlotAllocator  # noqa: E402
from kvbridge.transport.base import TransferSpec, Transport  # noqa: E402
from kvbridge.transport.regions import PoolRegion  # noqa: E402
from kvbridge.transport.shm import ShmTransport  # noqa: E402
from kvbridge.transport.tcp import TcpTransport  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
DEFAULT_SIZES = [64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB]
NUM_LAYERS = 4
TRANSFER_CASES = ("shm", "shm-pull", "tcp", "tcp-pull", "tcp-cold")
TRANSFER_NOTES = (
    "4 layers; producer = another process, pinned to its own CPU, the consumer to another (--no-pin: the OS",
    "places both, and may put them on one core); destination = a pre-allocated, pre-touched",
    "pool (as a real KV pool); time = start_recv -> wait -> close in the consumer, median over reps (then",
    "median over --repeat runs); memcpy = numpy copy of the same size timed just before each rep.",
    "shm: published layer-wise transfer; progress through an entry of the pool's control table (one",
    "shm file per producer pool, mapped once per consumer transport: a transfer opens no file);",
    "shm-pull: by KV handle, includes the pin round trip to the block server (loopback tcp) and the unpin.",
    "tcp: published transfer; tcp-pull: by KV handle from the block server (the serving path); both on a",
    "warm pooled connection, xxh3_64 on. tcp-cold: a new transport per pull (connect + Hello included).",
)


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


def pin_cpus() -> tuple[int, int] | None:
    """(consumer CPU, producer CPU): two different CPUs of this process's affinity set, or None
    when it has fewer than two."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


def _producer(conn: Connection, cpu: int | None) -> None:
    """The prefill side: per size, a random pool served by its block server (pulls by handle);
    on request, a published transfer of the whole pool over shm or tcp. Exits on None."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    tcp = TcpTransport()
    transports: dict[str, Transport] = {"shm": ShmTransport(), "tcp": tcp}
    pool: HostBlockPool | None = None
    while (request := conn.recv()) is not None:
        if request[0] == "pool":
            if pool is not None:
                pool.close()
            pool = HostBlockPool.create(_layout(request[1]))
            pool.array[:] = np.random.default_rng(0).integers(0, 256, pool.array.shape, np.uint8)
            alloc = SlotAllocator(pool.layout.num_slots)
            slots = tuple(alloc.allocate(pool.layout.num_slots) or ())
            tcp.serve_pool(pool, alloc)
            conn.send(TransferSpec("", NUM_LAYERS, len(slots) * pool.layout.block_bytes, endpoint=tcp.endpoint,
                                   source_slots=slots, pool_name=pool.handle.name,
                                   source_gens=alloc.generations(slots)))
            continue
        _, name, transfer_id = request
        if pool is None:
            raise RuntimeError("publish before pool")
        slots = tuple(range(pool.layout.num_slots))
        nbytes = len(slots) * pool.layout.block_bytes
        spec = (tcp.spec_for(transfer_id, NUM_LAYERS, nbytes, slots) if name == "tcp" else
                TransferSpec(transfer_id, NUM_LAYERS, nbytes, pool=pool.handle, source_slots=slots))
        send = transports[name].start_send(spec, PoolRegion(pool.array, slots))
        for layer in range(NUM_LAYERS):
            send.publish_layer(layer)
        conn.send(spec)
        send.wait(time.monotonic() + 120)
        send.close()
        conn.send("done")
    for transport in transports.values():
        transport.close()
    if pool is not None:
        pool.close()


def _reps(size_bytes: int) -> int:
    return max(5, min(50, (256 * MIB) // size_bytes))


class _Consumer:
    """The decode side: pre-faulted destination pool; times start_recv -> wait -> close per case."""

    def __init__(self, conn: Connection, size: int) -> None:
        self.conn, self.size = conn, size
        self.dest = HostBlockPool.create(_layout(size))
        self.dest.array.fill(1)  # a real pool is allocated once and already touched
        self.region = PoolRegion(self.dest.array, tuple(range(self.dest.layout.num_slots)))
        self.memcpy_src = np.random.default_rng(1).integers(0, 256, size, np.uint8)
        self.memcpy_dst = np.ones(size, np.uint8)
        conn.send(("pool", size))
        self.pull_spec: TransferSpec = conn.recv()

    def pull(self, transport: Transport) -> float:
        start = time.perf_counter()
        recv = transport.start_recv(self.pull_spec, self.region)
        recv.wait(time.monotonic() + 120)
        recv.close()
        return time.perf_counter() - start

    def published(self, transport: Transport, name: str, rep: int) -> float:
        self.conn.send(("xfer", name, f"bench-{name}-{self.size}-{rep}"))
        spec = self.conn.recv()
        start = time.perf_counter()
        recv = transport.start_recv(spec, self.region)
        recv.wait(time.monotonic() + 120)
        recv.close()
        elapsed = time.perf_counter() - start
        if self.conn.recv() != "done":
            raise RuntimeError("producer failed")
        return elapsed

    def memcpy(self) -> float:
        start = time.perf_counter()
        np.copyto(self.memcpy_dst, self.memcpy_src)
        return time.perf_counter() - start

    def close(self) -> None:
        del self.region
        self.dest.close()


def _cold_tcp_pull(consumer: _Consumer) -> float:
    transport = TcpTransport()
    try:
        return consumer.pull(transport)
    finally:
        transport.close()


def _cases(consumer: _Consumer, shm: ShmTransport, tcp: TcpTransport) -> dict[str, Callable[[int], float]]:
    return {
        "shm": lambda rep: consumer.published(shm, "shm", rep),
        "shm-pull": lambda rep: consumer.pull(shm),
        "tcp": lambda rep: consumer.published(tcp, "tcp", rep),
        "tcp-pull": lambda rep: consumer.pull(tcp),
        "tcp-cold": lambda rep: _cold_tcp_pull(consumer),
    }


def _measure(consumer: _Consumer, case: Callable[[int], float]) -> tuple[float, float]:
    """Median GB/s of ``case`` and of a memcpy of the same size timed just before each rep
    (same load on this shared machine); rep 0 warms up (connections, mappings) and is dropped."""
    times, copies = [], []
    for rep in range(_reps(consumer.size) + 1):
        copy_s = consumer.memcpy()
        elapsed = case(rep)
        if rep:
            times.append(elapsed)
            copies.append(copy_s)
    return consumer.size / statistics.median(times) / 1e9, consumer.size / statistics.median(copies) / 1e9


def transfer_section(sizes: list[int], pin: bool) -> list[TransferRow]:
    """One run over ``sizes``; with ``pin``, producer and consumer each on their own CPU."""
    cpus = pin_cpus() if pin else None
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_producer, args=(child, cpus[1] if cpus else None), daemon=True)
    proc.start()
    previous = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[0]})
    shm, tcp = ShmTransport(), TcpTransport()
    results: dict[str, list[TransferRow]] = {case: [] for case in TRANSFER_CASES}
    try:
        for size in sizes:
            consumer = _Consumer(conn, size)
            for name, case in _cases(consumer, shm, tcp).items():
                gbps, memcpy = _measure(consumer, case)
                results[name].append(TransferRow(name, size, gbps, memcpy, gbps / memcpy))
            consumer.close()
    finally:
        conn.send(None)
        proc.join(60)
        shm.close()
        tcp.close()
        os.sched_setaffinity(0, previous)
    return [row for rows in results.values() for row in rows]


def median_rows(runs: list[list[TransferRow]]) -> list[TransferRow]:
    """Per (transport, size): the median GB/s and memcpy GB/s over repeated runs."""
    out = []
    for rows in zip(*runs, strict=True):
        gbps = statistics.median(r.gbps for r in rows)
        memcpy = statistics.median(r.memcpy_gbps for r in rows)
        out.append(TransferRow(rows[0].transport, rows[0].size_bytes, gbps, memcpy, gbps / memcpy))
    return out


def print_transfer_table(rows: list[TransferRow]) -> None:
    print(f"{'transport':<10}{'size':>10}{'GB/s':>10}{'memcpy GB/s':>14}{'ratio':>8}")
    for row in rows:
        size = f"{row.size_bytes // MIB} MiB" if row.size_bytes >= MIB else f"{row.size_bytes // KIB} KiB"
        print(f"{row.transport:<10}{size:>10}{row.gbps:>10.2f}{row.memcpy_gbps:>14.2f}{row.ratio:>8.2f}")
    print("notes: " + "\n       ".join(TRANSFER_NOTES))


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
    parser.add_argument("--repeat", type=int, default=1, help="transfer section runs; the table shows medians")
    parser.add_argument("--no-pin", action="store_true",
                        help="let the OS place producer and consumer (default: one CPU each, as workers are pinned)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results: dict[str, object] = {}
    if args.section in ("all", "radix"):
        results["radix"] = radix_section()
    if args.section in ("all", "transfer"):
        rows = median_rows([transfer_section(args.sizes, not args.no_pin) for _ in range(max(1, args.repeat))])
        print_transfer_table(rows)
        results["transfer"] = [asdict(row) for row in rows]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
