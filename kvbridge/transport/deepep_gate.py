"""Per-layer agreement between a deepep producer and consumer, through a torch.distributed Store.

Why: a DeepEP dispatch is a collective, and a rank that enters it early spins on the host (in
``csrc/deep_ep.cpp``, ``Buffer::intranode_dispatch`` / ``internode_dispatch`` busy-wait on the
received-token counter the notify kernel fills, until ``NUM_CPU_TIMEOUT_SECS``) without
releasing the GIL (the pybind bindings do not), freezing every Python thread of that process;
a rank whose peer never enters hangs until that timeout or a device trap. So both ranks enter a
layer's dispatch only after agreeing, in the store, that both will: the producer once the layer
is published, the consumer once it is ready to take it. A rank that gives up says so instead and
neither side enters; the group's sequence of collectives stays matched either way.

One key per (transfer, layer), moved only by atomic ``compare_set``:

* producer: absent -> ``offer`` (:meth:`offer`); ``offer`` -> ``withdrawn`` (:meth:`withdraw`),
  or absent -> ``withdrawn`` when it gives up before offering;
* consumer: ``offer`` -> ``accept`` (:meth:`accept`; both then dispatch); absent or ``offer`` ->
  ``refused`` (:meth:`refuse`).

A final value is deleted by the side that reads it last (``accept``/``refused``: the producer;
``withdrawn``: the consumer), so a finished transfer leaves no key behind; a side that dies
mid-transfer leaves at most one.
"""

from __future__ import annotations

from typing import Any

OFFER, ACCEPT, WITHDRAWN, REFUSED = b"offer", b"accept", b"withdrawn", b"refused"
KEY_PREFIX = "kvbridge/deepep"


class LayerGate:
    """The store side of one transfer between a producer and a consumer (see the module doc).

    ``store`` is any ``torch.distributed.Store`` both ranks reach (the default group's store in
    the transport). Not thread-safe: one side of a transfer is driven by one thread.
    """

    def __init__(self, store: Any, transfer_id: str) -> None:
        if not transfer_id:
            raise ValueError("transfer_id: the deepep gate needs a non-empty transfer id")
        self._store = store
        self._prefix = f"{KEY_PREFIX}/{transfer_id}/"

    def key(self, layer: int) -> str:
        return f"{self._prefix}{layer}"

    def _cas(self, layer: int, expected: bytes, desired: bytes) -> bytes:
        got: bytes = self._store.compare_set(self.key(layer), expected, desired)
        return got

    def _done(self, layer: int, value: bytes) -> bytes:
        self._store.delete_key(self.key(layer))
        return value

    # producer

    def offer(self, layer: int) -> bytes:
        """Offers layer ``layer``: OFFER, or REFUSED when the consumer gave up first (final)."""
        got = self._cas(layer, b"", OFFER)
        return got if got == OFFER else self._done(layer, got)

    def answer(self, layer: int) -> bytes:
        """The consumer's answer to an offer: ACCEPT or REFUSED (final), OFFER while pending."""
        got: bytes = self._store.get(self.key(layer))
        return got if got == OFFER else self._done(layer, got)

    def refused_early(self, layer: int) -> bool:
        """Whether the consumer refused ``layer`` before the producer offered it: before its offer,
        only a refusal creates the key. Changes nothing (:meth:`withdraw` then reads and deletes it)."""
        return bool(self._store.check([self.key(layer)]))

    def withdraw(self, layer: int) -> bytes:
        """Gives up on ``layer`` (offered or not): WITHDRAWN, or the consumer's final answer.

        ACCEPT means the consumer is already entering the dispatch: the producer must join it.
        """
        got = self._cas(layer, b"", WITHDRAWN)
        if got == OFFER:
            got = self._cas(layer, OFFER, WITHDRAWN)
        return got if got == WITHDRAWN else self._done(layer, got)

    # consumer

    def accept(self, layer: int) -> bytes | None:
        """Takes an offer of ``layer``: ACCEPT (dispatch now), WITHDRAWN (final), None if none yet."""
        if not self._store.check([self.key(layer)]):
            return None
        got = self._cas(layer, OFFER, ACCEPT)
        return self._done(layer, got) if got == WITHDRAWN else got

    def refuse(self, layer: int) -> bytes:
        """Gives up on ``layer``: REFUSED, WITHDRAWN (final), or ACCEPT if already accepted."""
        got = self._cas(layer, b"", REFUSED)
        if got == OFFER:
            got = self._cas(layer, OFFER, REFUSED)
        return self._done(layer, got) if got == WITHDRAWN else got
