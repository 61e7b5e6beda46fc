"""The slot allocator of a block pool: reference counts and generations per slot.

One per pool, in the process that owns the pool; the block server pins through it, so a
slot being read by a transfer is never handed out again before the transfer unpins it, and a
pull by (slot, generation) of a slot reused since is refused as stale.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from kvbridge.errors import StaleSlots


class SlotAllocator:
    """Reference-counted slots of one pool (thread-safe), each with a generation.

    ``allocate(n)`` hands out n free slots with one reference each (None when fewer are free);
    ``pin`` adds a reference (e.g. a transfer in flight), ``free``/``unpin`` drop one; a slot
    returns to the free list when its last reference goes, so freeing a slot that a pull is
    still reading only takes effect after the pull unpins it. Every call validates all ids
    before changing anything. Invariant (``check_integrity``): free + used == total.

    Generations: ``allocate`` bumps the generation of every slot it hands out (a slot that was
    never allocated has generation 0), so a slot freed and handed out again differs from what
    a KV handle recorded (``generations``) when it was built; ``pin(ids, gens)`` refuses such a
    stale slot with StaleSlots instead of pinning another sequence's blocks.
    """

    def __init__(self, num_slots: int, on_unpin: Callable[[tuple[int, ...]], None] | None = None) -> None:
        """``on_unpin`` (optional) hears every ``unpin`` after it took effect, from the
        unpinning thread (e.g. a block server's, ending a pull): it must be cheap and never raise."""
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots: expected an int >= 1, got {num_slots!r}")
        self.num_slots = num_slots
        self._refs = [0] * num_slots
        self._gens = [0] * num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._lock = threading.Lock()
        self._on_unpin = on_unpin

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def refcount(self, slot: int) -> int:
        return self._refs[slot]

    def generations(self, slots: Iterable[int]) -> tuple[int, ...]:
        """The current generation of each slot (allocated or not); ValueError for an id out of range."""
        with self._lock:
            ids = self._in_range(slots, "generations")
            return tuple(self._gens[slot] for slot in ids)

    def allocate(self, n: int) -> list[int] | None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        with self._lock:
            if n > len(self._free):
                return None
            slots = [self._free.popleft() for _ in range(n)]
            for slot in slots:
                self._refs[slot] = 1
                self._gens[slot] += 1
            return slots

    def pin(self, ids: Iterable[int], gens: Sequence[int] | None = None) -> None:
        """Adds a reference to each (allocated) slot.

        With ``gens`` (one per id), first checks under the lock that every slot is allocated
        and still has that generation; if one is not, raises StaleSlots naming the first such
        slot and pins nothing.
        """
        slots = list(ids)
        if gens is not None and len(gens) != len(slots):
            raise ValueError(f"gens: expected {len(slots)} generations (one per slot), got {len(gens)}")
        with self._lock:
            self._validated(slots, "pin", gens)
            for slot in slots:
                self._refs[slot] += 1

    def free(self, ids: Iterable[int]) -> None:
        """Drops one reference from each slot; slots left with none become free."""
        with self._lock:
            slots = self._validated(ids, "free")
            for slot in slots:
                self._refs[slot] -= 1
                if self._refs[slot] == 0:
                    self._free.append(slot)

    def unpin(self, ids: Iterable[int]) -> None:
        """Drops a ``pin``'s reference from each slot (as ``free``), then tells ``on_unpin``."""
        slots = tuple(ids)
        self.free(slots)
        if self._on_unpin is not None:
            self._on_unpin(slots)

    def _in_range(self, ids: Iterable[int], op: str) -> list[int]:
        slots = list(ids)
        for slot in slots:
            if not isinstance(slot, int) or not 0 <= slot < self.num_slots:
                raise ValueError(f"ids: {op} of slot {slot!r} out of range [0, {self.num_slots})")
        return slots

    def _validated(self, ids: Iterable[int], op: str, gens: Sequence[int] | None = None) -> list[int]:
        """The ids, in range and allocated (with ``gens``: still of those generations, else
        StaleSlots, checked first); ValueError otherwise."""
        slots = self._in_range(ids, op)
        if gens is not None:
            for slot, expected in zip(slots, gens, strict=True):
                if self._refs[slot] == 0 or self._gens[slot] != expected:
                    raise StaleSlots(slot, expected, self._gens[slot], allocated=self._refs[slot] > 0)
        drops: dict[int, int] = {}
        for slot in slots:
            drops[slot] = drops.get(slot, 0) + 1
            if self._refs[slot] == 0 or (op == "free" and drops[slot] > self._refs[slot]):
                raise ValueError(f"ids: {op} of slot {slot} which is not allocated (refcount {self._refs[slot]})")
        return slots

    def check_integrity(self) -> None:
        """RuntimeError if the free list and reference counts disagree, or a used slot has
        never been allocated (generation 0)."""
        with self._lock:
            free = set(self._free)
            if len(free) != len(self._free):
                raise RuntimeError("slot allocator: duplicate slot on the free list")
            used = sum(1 for r in self._refs if r > 0)
            if any(self._refs[s] != 0 for s in free) or any(r < 0 for r in self._refs):
                raise RuntimeError("slot allocator: a free slot has references")
            if len(free) + used != self.num_slots:
                raise RuntimeError(f"slot allocator: free {len(free)} + used {used} != total {self.num_slots}")
            if any(r > 0 and g == 0 for r, g in zip(self._refs, self._gens, strict=True)):
                raise RuntimeError("slot allocator: a used slot was never allocated (generation 0)")
