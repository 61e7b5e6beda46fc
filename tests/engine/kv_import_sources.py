"""KV sources for the asynchronous-import tests: each layer is held back until the test opens
its gate, so a test decides exactly where an import worker is blocked."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from backends.engine.hooks import KVImportError

SAFETY_TIMEOUT_S = 10.0  # a source that ignores its deadline still gives up here (no hung test)


class GatedSource:
    """A `KVSource` delivering `layers[i]` once `open(i)` was called.

    `honour_deadline=False` makes `read_layer` ignore its deadline (a misbehaving transport);
    `fail_at` raises KVImportError at that layer once it is opened.
    """

    def __init__(
        self,
        num_tokens: int,
        layers: list[torch.Tensor],
        *,
        honour_deadline: bool = True,
        fail_at: int | None = None,
    ) -> None:
        self.num_tokens = num_tokens
        self.layers = layers
        self.honour_deadline = honour_deadline
        self.fail_at = fail_at
        self.gates = [threading.Event() for _ in layers]
        self.reads: list[int] = []  # layers whose read started, in order
        self.delivered: list[int] = []  # layers written into the destination
        self.failures: list[str] = []  # the KVImportErrors it raised

    def open(self, *layers: int) -> None:
        for layer in layers or range(len(self.gates)):
            self.gates[layer].set()

    def read_layer(self, layer: int, dst: torch.Tensor, deadline: float) -> None:
        self.reads.append(layer)
        wait_s = deadline - time.monotonic() if self.honour_deadline else SAFETY_TIMEOUT_S
        if not self.gates[layer].wait(max(0.0, wait_s)):
            self.failures.append(f"layer {layer} late")
            raise KVImportError(f"layer {layer} did not arrive before the deadline")
        if layer == self.fail_at:
            self.failures.append(f"layer {layer} failed")
            raise KVImportError(f"peer went away at layer {layer}")
        dst.copy_(self.layers[layer])
        self.delivered.append(layer)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll `predicate()` until it is true; AssertionError after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)
