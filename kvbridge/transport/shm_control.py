"""The per-pool control table of the shm transport: one entry per published transfer.

One shared-memory file ``/dev/shm/kvb-ctl-<pool name>`` per producer pool, created once by the
producer process (the first ``start_send`` from that pool) and mapped once by each consumer
transport. Layout, int64 words: a header (magic, capacity, high water, 5 reserved) then
``capacity`` entries of 8 words (one 64-byte line each)::

    ID  GEN  NUM_LAYERS  LAYER_NBYTES  PUBLISHED  PSTATE | ACKED  CSTATE
    ----------------- producer writes ----------------- | - consumer writes -

No compare-and-swap: ownership decides who writes what. Only the producer process allocates
and reclaims entries (a LIFO free list in its own memory, under a thread lock); the consumer
writes only its two words, each tagged with the entry's generation (``gen << 32 | value``) so
the producer ignores words a consumer of an earlier generation left behind. Allocation writes
the header words and then ID (the publish point); reclaiming clears ID and bumps GEN, so a
consumer holding a stale (index, generation) fails cleanly. An entry is reclaimed once both
sides are done: at the producer's close when the consumer has acked every layer or aborted,
otherwise (the producer gave up first) after the consumer's final word or a grace period,
since a consumer may be between its generation check and its word store. Word stores are
single aligned 8-byte writes, and x86's store order makes data-before-counter visible in order.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time

import xxhash

from kvbridge.pool import SHM_DIR

CTL_MAGIC = 0x4B56424354424C31  # "KVBCTBL1"
_H_MAGIC, _H_CAPACITY, _H_HIGH_WATER = range(3)
ID, GEN, NUM_LAYERS, LAYER_NBYTES, PUBLISHED, PSTATE, ACKED, CSTATE = range(8)
ENTRY_WORDS = 8
RUNNING, PRODUCER_ABORTED, CONSUMER_ABORTED = 0, 1, 2
_GEN_MASK = (1 << 31) - 1
_VALUE_MASK = (1 << 32) - 1


def table_path(pool_name: str) -> str:
    return f"{SHM_DIR}/kvb-ctl-{pool_name}"


def transfer_key(transfer_id: str) -> int:
    """A nonzero int64 naming the transfer in the table (the same in every process)."""
    key = xxhash.xxh3_64_intdigest(transfer_id.encode())
    return (key - (1 << 64) if key >= 1 << 63 else key) or 1


def tag(gen: int, value: int) -> int:
    """A consumer word: ``value`` for generation ``gen``."""
    return (gen << 32) | value


def untag(word: int, gen: int) -> int | None:
    """The value of a consumer word if it belongs to generation ``gen``, else None."""
    return word & _VALUE_MASK if word >> 32 == gen else None


class TableView:
    """A mapping of one control table: word access by (entry, word); the file is not owned."""

    def __init__(self, path: str, fd: int, nbytes: int) -> None:
        self.path = path
        self.inode = os.fstat(fd).st_ino
        self._mm: mmap.mmap | None = mmap.mmap(fd, nbytes)
        self._words: memoryview | None = memoryview(self._mm).cast("q")

    @classmethod
    def attach(cls, pool_name: str) -> TableView | None:
        """Maps the producer's table of ``pool_name``; None while it does not exist (yet)."""
        path = table_path(pool_name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            nbytes = os.fstat(fd).st_size
            if nbytes < ENTRY_WORDS * 8:
                return None  # being created: not yet sized
            view = cls(path, fd, nbytes)
        finally:
            os.close(fd)
        if view.header(_H_MAGIC) != CTL_MAGIC:
            view.close()
            return None
        return view

    def is_current(self) -> bool:
        """False once the file was unlinked or replaced (its producer closed); remap then."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False

    def _checked(self) -> memoryview:
        if self._words is None:
            raise RuntimeError(f"shm control table {self.path} is closed")
        return self._words

    def header(self, word: int) -> int:
        return int(self._checked()[word])

    def set_header(self, word: int, value: int) -> None:
        self._checked()[word] = value

    def get(self, entry: int, word: int) -> int:
        return int(self._checked()[ENTRY_WORDS * (entry + 1) + word])

    def set(self, entry: int, word: int, value: int) -> None:
        self._checked()[ENTRY_WORDS * (entry + 1) + word] = value

    def entry(self, entry: int) -> list[int]:
        """All words of ``entry``, read in word order (ID first) in one call."""
        base = ENTRY_WORDS * (entry + 1)
        return self._checked()[base:base + ENTRY_WORDS].tolist()

    def find(self, key: int) -> list[int]:
        """Entries (below the high water) whose ID is ``key``."""
        words = self._checked()
        high = int(words[_H_HIGH_WATER])
        ids = words[ENTRY_WORDS + ID:ENTRY_WORDS * (high + 1):ENTRY_WORDS].tolist()
        return [i for i, entry_id in enumerate(ids) if entry_id == key] if key in ids else []

    def close(self) -> None:
        """Unmaps. Idempotent; later accesses raise RuntimeError."""
        if self._mm is None:
            return
        if self._words is not None:
            self._words.release()
            self._words = None
        mm, self._mm = self._mm, None
        mm.close()


class ProducerTable:
    """The producer process's side of one pool's table: owns the file and the free list."""

    def __init__(self, pool_name: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: expected >= 1, got {capacity}")
        path = table_path(pool_name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, ENTRY_WORDS * 8 * (capacity + 1))
            self.view = TableView(path, fd, ENTRY_WORDS * 8 * (capacity + 1))
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        self.pool_name = pool_name
        self.capacity = capacity
        self._lock = threading.Lock()
        self._free: list[int] = []
        self.high_water = 0
        self._live: dict[int, int] = {}  # entry -> key of a transfer whose producer is open
        self._retired: dict[int, float] = {}  # entry -> reclaim time; the producer closed first
        self.refs = 0  # transports using the table (see acquire_table)
        self.view.set_header(_H_CAPACITY, capacity)
        self.view.set_header(_H_MAGIC, CTL_MAGIC)

    @property
    def num_in_use(self) -> int:
        """Entries not on the free list (live plus retired)."""
        with self._lock:
            return len(self._live) + len(self._retired)

    def allocate(self, key: int, num_layers: int, layer_nbytes: int) -> tuple[int, int]:
        """A fresh (entry, generation) published under ``key``; ValueError if ``key`` is live."""
        with self._lock:
            if key in self._live.values():
                raise ValueError(f"transfer_id: a transfer with this id is in flight on pool {self.pool_name!r}")
            self._reclaim_retired(key)
            entry = self._take_free()
            view = self.view
            gen = view.get(entry, GEN)
            view.set(entry, NUM_LAYERS, num_layers)
            view.set(entry, LAYER_NBYTES, layer_nbytes)
            view.set(entry, PUBLISHED, 0)
            view.set(entry, PSTATE, RUNNING)
            view.set(entry, ID, key)  # last: the consumer may use the entry from here on
            self._live[entry] = key
            return entry, gen

    def _take_free(self) -> int:
        if self._free:
            return self._free.pop()
        if self.high_water == self.capacity:
            raise RuntimeError(f"shm control table of pool {self.pool_name!r} is full "
                               f"({self.capacity} transfers in flight or retiring)")
        entry = self.high_water
        self.view.set(entry, GEN, 1)
        self.high_water += 1
        self.view.set_header(_H_HIGH_WATER, self.high_water)
        return entry

    def _reclaim_retired(self, key: int) -> None:
        """Frees retired entries whose consumer is done, whose grace ran out, or that reuse ``key``."""
        now = time.monotonic()
        for entry, reclaim_at in list(self._retired.items()):
            if now >= reclaim_at or self.consumer_done(entry) or self.view.get(entry, ID) == key:
                del self._retired[entry]
                self._free_entry(entry)

    def consumer_done(self, entry: int) -> bool:
        """The consumer of the entry's current generation acked every layer or gave up."""
        view = self.view
        gen = view.get(entry, GEN)
        acked = untag(view.get(entry, ACKED), gen)
        return (acked is not None and acked >= view.get(entry, NUM_LAYERS)
                or untag(view.get(entry, CSTATE), gen) == CONSUMER_ABORTED)

    def release(self, entry: int, grace_s: float) -> None:
        """The producer's close: frees the entry now if the consumer is done, else marks it
        aborted (the consumer fails fast) and frees it after the consumer's final word or ``grace_s``."""
        with self._lock:
            if self._live.pop(entry, None) is None:
                return
            if self.consumer_done(entry):
                self._free_entry(entry)
                return
            self.view.set(entry, PSTATE, PRODUCER_ABORTED)
            self._retired[entry] = time.monotonic() + grace_s

    def _free_entry(self, entry: int) -> None:
        self.view.set(entry, ID, 0)
        self.view.set(entry, GEN, (self.view.get(entry, GEN) + 1) & _GEN_MASK or 1)
        self._free.append(entry)

    def close(self) -> None:
        """Unlinks and unmaps the table (consumers still mapping it see no new transfers)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.view.path)
        self.view.close()


_tables: dict[str, ProducerTable] = {}
_tables_lock = threading.Lock()


def acquire_table(pool_name: str, capacity: int) -> ProducerTable:
    """This process's table for ``pool_name`` (created on first use); pair with release_table."""
    with _tables_lock:
        table = _tables.get(pool_name)
        if table is None:
            table = _tables[pool_name] = ProducerTable(pool_name, capacity)
        table.refs += 1
        return table


def release_table(pool_name: str) -> None:
    """Drops one reference; the last one unlinks the table."""
    with _tables_lock:
        table = _tables.get(pool_name)
        if table is None:
            return
        table.refs -= 1
        if table.refs <= 0:
            del _tables[pool_name]
            table.close()
