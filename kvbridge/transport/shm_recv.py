"""Consumer side of a published shm transfer (see shm.py): copies each layer the producer has
published straight from the producer's pool into the destination runs, and acks it.

The handle finds its entry in the producer pool's control table (shm_control.py) by the spec's
transfer_id and writes only that entry's ACKED and CSTATE words, tagged with the entry's
generation; it fails with RemoteError when the producer gave up or the entry was reclaimed (a
stale generation), with TransferTimeout past a deadline. It writes the destination until
``close()``, which marks an unfinished transfer aborted so the producer fails fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvbridge.errors import RemoteError, TransferTimeout, describe_pending
from kvbridge.transport.base import LayerBuffers, RecvHandle, TransferSpec, wait_until
from kvbridge.transport.regions import PoolRegion, copy_layers
from kvbridge.transport.shm_control import (
    ACKED,
    CONSUMER_ABORTED,
    CSTATE,
    GEN,
    ID,
    LAYER_NBYTES,
    NUM_LAYERS,
    PRODUCER_ABORTED,
    PSTATE,
    PUBLISHED,
    TableView,
    tag,
    transfer_key,
)


class ShmRecvHandle(RecvHandle):
    """Copies published layers; writes only its entry's ACKED and CSTATE words (gen-tagged)."""

    def __init__(self, spec: TransferSpec, source: PoolRegion, dest: LayerBuffers,
                 locate: Callable[[bool], TableView | None]) -> None:
        self.spec = spec
        self.num_layers = spec.num_layers
        self._buffers: tuple[PoolRegion, LayerBuffers] | None = (source, dest)
        self._locate = locate
        self._key = transfer_key(spec.transfer_id)
        self._view: TableView | None = None
        self._entry = self._gen = 0
        self._copied = 0
        self._closed = False

    def poll(self) -> int:
        return self._copied

    def _find_entry(self) -> list[int] | None:
        """Finds our entry in the pool's table and returns its words; None while the producer
        has not published it."""
        view = self._locate(False)
        found = [] if view is None else view.find(self._key)
        if not found:
            if view is not None and not view.is_current():
                self._locate(True)  # the producer's table was replaced: map the new one next time
            return None
        if view is None:
            raise RuntimeError("unreachable: entries found without a table")
        for entry in found:
            gen = view.get(entry, GEN)  # before ID: reclaiming clears ID first, then bumps GEN
            words = view.entry(entry)
            if words[ID] != self._key or words[GEN] != gen:
                continue  # reclaimed while we looked
            if (words[NUM_LAYERS], words[LAYER_NBYTES]) != (self.num_layers, self.spec.layer_nbytes):
                raise ValueError(
                    f"spec: transfer {self.spec.transfer_id!r} says {self.num_layers} x {self.spec.layer_nbytes} "
                    f"bytes, the producer publishes {words[NUM_LAYERS]} x {words[LAYER_NBYTES]}"
                )
            self._view, self._entry, self._gen = view, entry, gen
            return words
        return None

    def _current_words(self, view: TableView) -> list[int]:
        """Our entry's words, read now; see :meth:`_checked`."""
        return self._checked(view.entry(self._entry))

    def _checked(self, words: list[int]) -> list[int]:
        """``words``, or RemoteError if our entry was reclaimed (and perhaps reused) by the
        producer or the producer gave up."""
        if words[GEN] != self._gen:
            raise RemoteError("stale", f"shm transfer {self.spec.transfer_id}: control entry {self._entry} "
                                       f"was reclaimed (generation {self._gen}, now {words[GEN]}); "
                                       f"the producer ended it")
        if words[PSTATE] == PRODUCER_ABORTED:
            raise RemoteError("aborted", f"shm transfer {self.spec.transfer_id}: the producer gave up")
        return words

    def _step(self) -> bool:
        """Copies the next published layers if there are any; True when it made progress."""
        found = None
        if self._view is None:
            found = self._find_entry()
            if found is None:
                return False
        view = self._view
        if view is None or self._buffers is None:
            raise RuntimeError(f"shm transfer {self.spec.transfer_id} is closed")
        published = (self._checked(found) if found else self._current_words(view))[PUBLISHED]
        if published <= self._copied:
            return False
        source, dest = self._buffers
        copy_layers(source, dest, self._copied, published)  # every layer published so far, at once
        # the producer marks an abort before it unpins: the copy counts only if it held throughout
        self._current_words(view)
        self._copied = published
        view.set(self._entry, ACKED, tag(self._gen, published))
        return True

    def wait_layer(self, layer: int, deadline: float) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: {layer} out of range [0, {self.num_layers})")
        if self._closed:
            raise RuntimeError(f"shm transfer {self.spec.transfer_id} is closed")
        start = time.monotonic()
        while self._copied <= layer:
            if not wait_until(self._step, deadline):
                raise TransferTimeout(
                    f"shm recv {self.spec.transfer_id}", deadline - start,
                    describe_pending(list(range(self._copied, layer + 1))),
                )

    def close(self) -> None:
        """Marks an unfinished transfer aborted (if our entry is still ours) and drops both pools' views."""
        self._closed = True
        self._buffers = None
        view, self._view = self._view, None
        if view is None or self._copied >= self.num_layers:
            return
        try:
            if view.get(self._entry, GEN) == self._gen:
                view.set(self._entry, CSTATE, tag(self._gen, CONSUMER_ABORTED))
        except RuntimeError:
            pass  # our transport closed the table first: the producer's grace period reclaims
