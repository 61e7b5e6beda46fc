"""Moving KV in and out of the paged cache: block access for hooks, prefix loads at admission,
in-memory KV sources, and exports of prefill-only requests (imports: `kv_import.py`)."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from backends.engine.hooks import KVHooks, KVImportError
from backends.engine.outputs import KVExport, KVLayout
from backends.engine.sequence import Sequence


class PagedCacheAccess:
    """`hooks.KVCacheAccess` over an engine's per-layer cache tensors."""

    def __init__(self, kv_caches: list[torch.Tensor], layout: KVLayout) -> None:
        self.kv_caches = kv_caches
        self.layout = layout

    def _index(self, block_ids: Seq[int]) -> torch.Tensor:
        return torch.tensor(list(block_ids), dtype=torch.int64, device=self.kv_caches[0].device)

    def read_blocks(self, layer: int, block_ids: Seq[int]) -> torch.Tensor:
        return self.kv_caches[layer].index_select(0, self._index(block_ids))

    def write_blocks(self, layer: int, block_ids: Seq[int], data: torch.Tensor) -> None:
        cache = self.kv_caches[layer]
        expected = (len(block_ids), *cache.shape[1:])
        if tuple(data.shape) != expected:
            raise ValueError(f"data shape must be {expected}, got {tuple(data.shape)}")
        cache.index_copy_(0, self._index(block_ids), data.to(cache.device, cache.dtype))


class TensorKVSource:
    """A `hooks.KVSource` over layers already in memory (e.g. `KVExport.layer(i)` copies)."""

    def __init__(self, num_tokens: int, layers: list[torch.Tensor]) -> None:
        self.num_tokens = num_tokens
        self.layers = layers

    def read_layer(self, layer: int, dst: torch.Tensor, deadline: float) -> None:
        src = self.layers[layer]
        if src.shape != dst.shape:
            raise KVImportError(
                f"layer {layer} has shape {tuple(src.shape)}, need {tuple(dst.shape)}"
            )
        dst.copy_(src)


def export_kv(seq: Sequence, access: PagedCacheAccess) -> KVExport:
    """Describe the prompt KV held by a finished prefill-only sequence."""
    num_tokens = seq.num_prompt_tokens
    num_blocks = -(-num_tokens // access.layout.block_size)
    block_ids = tuple(int(b) for b in seq.block_table[:num_blocks])

    def read_layer(layer: int) -> torch.Tensor:
        return access.read_blocks(layer, block_ids)

    return KVExport(seq.request_id, num_tokens, access.layout, block_ids, read_layer)


class KVAdmission:
    """`scheduler.Admission`: loads a prefix from the hooks' store, synchronously (a local
    store is fast). A request's `kv_source` is imported by `kv_import.KVImporter` instead."""

    def __init__(self, access: PagedCacheAccess, hooks: KVHooks | None) -> None:
        self.access = access
        self.hooks = hooks

    def cached_tokens(self, seq: Sequence) -> int:
        if self.hooks is None:
            return 0
        found = self.hooks.lookup_prefix(seq.request_id, seq.token_ids)
        block_size = self.access.layout.block_size
        return max(0, min(found, len(seq) - 1) // block_size * block_size)  # full blocks, < len

    def load(self, seq: Sequence, num_tokens: int) -> int:
        """Fill the sequence's first blocks; on KVImportError report 0 so it recomputes.
        Blocks loaded from the store are not reported back to it (`num_published_blocks`)."""
        loaded = 0
        if self.hooks is not None:
            try:
                loaded = self.hooks.load_prefix(
                    seq.request_id,
                    seq.token_ids[:num_tokens],
                    list(seq.block_table[: num_tokens // self.access.layout.block_size]),
                    self.access,
                )
            except KVImportError:
                loaded = 0
        seq.num_published_blocks = loaded // self.access.layout.block_size
        return min(loaded, num_tokens)
