"""FlashMLA decode equals the pure-torch absorbed MLA decode (CUDA + flash_mla only)."""

from __future__ import annotations

import pytest
import torch

from backends.engine.attention import build_plan
from backends.engine.flashmla import flash_mla_available, flash_mla_decode, flash_mla_usable
from backends.engine.model_api import AttentionMetadata
from backends.engine.models.mla import mla_decode_torch

pytestmark = pytest.mark.skipif(
    not flash_mla_available(), reason="flash_mla is not importable or CUDA is unavailable")


def test_flash_mla_matches_torch_decode() -> None:
    rank, rope, heads, block_size = 512, 64, 16, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(32, block_size, rank + rope, device="cuda", generator=gen,
                        dtype=torch.bfloat16)
    context = torch.tensor([1, 63, 64, 65, 200], device="cuda")
    num_blocks = -(-int(context.max()) // block_size)
    tables = torch.randperm(32, device="cuda")[: 5 * num_blocks].view(5, num_blocks).int()
    meta = AttentionMetadata(torch.zeros(5, dtype=torch.int64, device="cuda"), list(range(6)),
                             context, tables, int(context.max()), True)
    plan = build_plan(meta, block_size, cache.dtype)
    q = torch.randn(5, heads, rank + rope, device="cuda", generator=gen, dtype=torch.bfloat16)
    w_uv = torch.eye(rank, device="cuda", dtype=torch.bfloat16)[None].expand(heads, -1, -1)
    assert flash_mla_usable(cache, rank, rope)
    assert plan.block_ids is not None and plan.context_lens is not None
    ours = mla_decode_torch(q, cache, plan, rank, 0.1, w_uv).float()
    flash = flash_mla_decode(q, cache, plan.block_ids, plan.context_lens, rank, 0.1).float()
    torch.testing.assert_close(flash, ours, atol=2e-2, rtol=2e-2)
