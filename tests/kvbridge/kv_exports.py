"""An engine-free KV export (what KVNode.publish takes) with random layers, for node tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbridge import KVLayoutSpec


@dataclass(frozen=True)
class Export:
    request_id: str
    num_tokens: int
    layout: KVLayoutSpec
    block_ids: tuple[int, ...]
    layers: list[torch.Tensor]

    def layer(self, index: int) -> torch.Tensor:
        return self.layers[index].clone()


def random_export(rid: str, num_tokens: int, seed: int, layout: KVLayoutSpec) -> Export:
    """``num_tokens`` tokens of seeded random KV in whole blocks of ``layout``."""
    num_blocks = -(-num_tokens // layout.block_size)
    gen = torch.Generator().manual_seed(seed)
    layers = [torch.randn(num_blocks, layout.block_size, layout.kv_width, generator=gen)
              for _ in range(layout.num_layers)]
    return Export(rid, num_tokens, layout, tuple(range(num_blocks)), layers)
