"""The protocols through which the engine reaches an external KV store (kvbridge).

The engine calls a `KVHooks` implementation at these points, always on its own step thread:
- admission of a request with nothing computed: `lookup_prefix`, then (after allocating
  blocks for that many tokens) `load_prefix` with those blocks;
- after each step, for each sequence whose KV filled new blocks, and when a request joins the
  batch after its `kv_source` import, for the full blocks the import wrote: `blocks_computed`;
- when a request finishes, is aborted or its exported KV is released: `request_finished`.
Hooks see the paged cache only through `KVCacheAccess`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from backends.engine.outputs import KVLayout


class KVImportError(Exception):
    """A KV source or store could not deliver the KV it promised (failure or deadline).

    The engine answers it by freeing the blocks and recomputing; it never surfaces to the caller.
    """


class KVCacheAccess(Protocol):
    """Block-granular access to one engine's paged KV cache."""

    layout: KVLayout

    def read_blocks(self, layer: int, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy `[len(block_ids), block_size, kv_width]` of those blocks of `layer`."""
        ...

    def write_blocks(self, layer: int, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Overwrite those blocks of `layer` with `data` `[len(block_ids), block_size, kv_width]`."""
        ...


class KVHooks(Protocol):
    """What a KV store implements to share KV with the engine."""

    def lookup_prefix(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Tokens (a multiple of block_size, < len(token_ids)) the store can load; no side effects."""
        ...

    def load_prefix(
        self,
        request_id: str,
        token_ids: Sequence[int],
        block_ids: Sequence[int],
        cache: KVCacheAccess,
    ) -> int:
        """Write the prefix KV into `block_ids`; return the tokens loaded (<= lookup result).

        `block_ids` covers the lookup result. Raising KVImportError counts as 0 loaded.
        """
        ...

    def blocks_computed(
        self,
        request_id: str,
        token_ids: Sequence[int],
        block_ids: Sequence[int],
        cache: KVCacheAccess,
    ) -> None:
        """New full blocks whose KV is written.

        `token_ids` are all tokens of the sequence up to the end of the last new block
        (len == k * block_size, so a store can hash the whole chain); `block_ids` are the new
        blocks only: they hold the last `len(block_ids) * block_size` of `token_ids`. Called at
        most once per block; blocks loaded through `load_prefix` are never reported. The full
        blocks of a successful `kv_source` import are reported once, when the request joins the
        batch after the import wrote them (so a store holds the chain the generated blocks extend).
        """
        ...

    def request_finished(self, request_id: str) -> None:
        """The request ended (finished, aborted, or its exported KV released)."""
        ...


class KVSource(Protocol):
    """KV for the first `num_tokens` prompt tokens of a request imported into this engine.

    The engine reads it on one of its import threads (`kv_import.KVImporter`), layer 0 first,
    never on the step thread and never concurrently. After the request was aborted the engine
    may still be inside `read_layer` until it returns; a source closed by its owner meanwhile
    must make that call raise (KVImportError), not crash.
    """

    num_tokens: int

    def read_layer(self, layer: int, dst: torch.Tensor, deadline: float) -> None:
        """Block until layer `layer` is written into `dst` `[num_blocks, block_size, kv_width]`.

        `deadline` is a `time.monotonic()` instant; raises KVImportError on failure or timeout
        (any other exception is treated the same way: the engine recomputes).
        """
        ...
