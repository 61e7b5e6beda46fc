"""FlashMLA decode for MLA models on CUDA, used only when `flash_mla` is importable.

FlashMLA consumes exactly our MLA cache layout (`[num_blocks, 64, 1, kv_lora_rank + rope]`,
block size 64) with DeepSeek's head dims (kv_lora_rank 512, rope 64) in bf16/fp16. When any
condition does not hold, callers use the pure-torch absorbed path; nothing here is emulated.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

_flash_mla: Any
try:  # optional GPU extra
    _flash_mla = importlib.import_module("flash_mla")
except ImportError:  # pragma: no cover - depends on the machine
    _flash_mla = None

FLASH_MLA_BLOCK_SIZE = 64
FLASH_MLA_KV_LORA_RANK = 512
FLASH_MLA_ROPE_DIM = 64
FLASH_MLA_DTYPES = (torch.bfloat16, torch.float16)


def flash_mla_available() -> bool:
    """True when the `flash_mla` package imports and CUDA is present."""
    return _flash_mla is not None and torch.cuda.is_available()


def flash_mla_usable(cache: torch.Tensor, kv_lora_rank: int, rope_dim: int) -> bool:
    """Whether `flash_mla_decode` can serve this layer's cache and head dims."""
    return (
        flash_mla_available()
        and cache.is_cuda
        and cache.dtype in FLASH_MLA_DTYPES
        and cache.shape[1] == FLASH_MLA_BLOCK_SIZE
        and kv_lora_rank == FLASH_MLA_KV_LORA_RANK
        and rope_dim == FLASH_MLA_ROPE_DIM
    )


def flash_mla_decode(q_full: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor,
                     context_lens: torch.Tensor, kv_lora_rank: int,
                     scale: float) -> torch.Tensor:
    """Absorbed MLA decode with FlashMLA.

    q_full [B, H, kv_lora_rank + rope] (q_nope already folded with W_UK), cache
    [num_blocks, 64, kv_lora_rank + rope], block_ids [B, n], context_lens [B].
    Returns the attention output in latent space, [B, H, kv_lora_rank].
    """
    if _flash_mla is None:
        raise RuntimeError("flash_mla_decode called without the flash_mla package")
    batch, num_heads, width = q_full.shape
    seqlens = context_lens.to(device=q_full.device, dtype=torch.int32)
    metadata, num_splits = _flash_mla.get_mla_metadata(seqlens, num_heads, 1)
    out, _ = _flash_mla.flash_mla_with_kvcache(
        q_full.view(batch, 1, num_heads, width),
        cache.view(cache.shape[0], cache.shape[1], 1, width),
        block_ids.to(torch.int32),
        seqlens,
        kv_lora_rank,
        metadata,
        num_splits,
        softmax_scale=scale,
        causal=True,
    )
    return out.view(batch, num_heads, kv_lora_rank)
