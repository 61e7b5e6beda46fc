"""Building blocks shared by the models: RMSNorm, SwiGLU MLP and rotary embeddings.

Numerics follow transformers' Llama / DeepSeek modules (float32 norm statistics, float32
rotary angles cast to the activation dtype) so logits match HF on the same weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from backends.engine.config import RopeConfig
from backends.engine.models.fused import FusedLinear, merge_fused_on_load


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        # HF order: statistics in float32, cast back, then scale in the activation dtype.
        return self.weight * F.rms_norm(x.float(), shape, None, self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); state-dict names match HF's LlamaMLP (gate/up are fused)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        parts = (("gate_proj", intermediate), ("up_proj", intermediate))
        self.gate_up_proj = FusedLinear(hidden, parts, bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        merge_fused_on_load(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def rope_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies [dim/2] float32, with llama3 scaling when configured."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.rope_type != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin [T, dim/2] for a step's positions, computed once per forward.

    The inverse frequencies stay float32 whatever the model dtype (they are not a buffer, so
    `model.to(dtype)` leaves them alone); they follow the positions' device.
    """

    def __init__(self, rope: RopeConfig, dim: int) -> None:
        super().__init__()
        self._inv_freq = rope_inv_freq(rope, dim)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self._inv_freq[None, :]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def neox_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step tables for `apply_rope_neox`: [T, 1, dim] cos and sign-folded sin."""
    return torch.cat((cos, cos), dim=-1)[:, None, :], torch.cat((-sin, sin), dim=-1)[:, None, :]


def apply_rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama/HF): x [T, heads, dim]; cos/sin from `neox_tables`.

    x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) folded into the sign
    of the sin table so that one roll replaces the two halves.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def apply_rope_interleave(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek RoPE on interleaved pairs (x0, x1), (x2, x3)...; output de-interleaved as
    [rotated evens, rotated odds] (HF DeepSeek-V3's layout; q and k agree, so scores match)."""
    c = cos[:, None, :]
    s = sin[:, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
