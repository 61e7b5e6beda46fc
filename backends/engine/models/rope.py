"""Rotary position embeddings (default, llama3, yarn) as HF transformers computes them.

Angles are float32 (`positions * inv_freq`), cos/sin are scaled by the rope's attention
factor (yarn) and cast to the activation dtype, as in HF's rotary modules.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from backends.engine.config import RopeConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(rope: RopeConfig) -> float:
    """The factor HF multiplies cos/sin by (1.0 except for yarn)."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
                ) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies [dim/2] float32, with llama3 or yarn scaling when configured."""
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, dim)
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
    """cos/sin [T, dim/2] for a step's positions.

    The inverse frequencies stay float32 whatever the model dtype (they are not a buffer, so
    `model.to(dtype)` leaves them alone); they follow the positions' device. With
    `max_position` (an upper bound of the positions), rows come from tables computed once for
    positions `[0, n)` (n grows by doubling): the same values, one gather per step.
    """

    def __init__(self, rope: RopeConfig, dim: int) -> None:
        super().__init__()
        self._inv_freq = rope_inv_freq(rope, dim)
        self._attention_factor = rope_attention_factor(rope)
        self._tables: dict[tuple[torch.dtype, torch.device, bool], torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if max_position is None:
            return self._compute(positions, dtype)
        table = self._table(max_position, dtype, positions.device, neox=False)
        cos, sin = table.index_select(0, positions).chunk(2, dim=-1)
        return cos, sin

    def neox(self, positions: torch.Tensor, dtype: torch.dtype,
             max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`neox_tables(*self(positions, dtype))`, gathered from a precomputed table."""
        table = self._table(max_position, dtype, positions.device, neox=True)
        cos, sin = table.index_select(0, positions)[:, None, :].chunk(2, dim=-1)
        return cos, sin

    def _compute(self, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self._inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self._attention_factor != 1.0:
            cos, sin = cos * self._attention_factor, sin * self._attention_factor
        return cos.to(dtype), sin.to(dtype)

    def _table(self, max_position: int, dtype: torch.dtype, device: torch.device,
               neox: bool) -> torch.Tensor:
        """[n, dim] (cos then sin) or, for neox, [n, 2 * dim] (`neox_tables` layout)."""
        key = (dtype, device, neox)
        table = self._tables.get(key)
        if table is None or table.shape[0] <= max_position:
            size = max(256, 1 << max_position.bit_length())
            cos, sin = self._compute(torch.arange(size, device=device), dtype)
            if neox:
                cos, sin = (t[:, 0, :] for t in neox_tables(cos, sin))
            table = torch.cat((cos, sin), dim=-1)
            self._tables[key] = table
        return table


def neox_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step tables for `apply_rope_neox`: [T, 1, dim] cos and sign-folded sin."""
    return torch.cat((cos, cos), dim=-1)[:, None, :], torch.cat((-sin, sin), dim=-1)[:, None, :]


def apply_rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama/HF): x [T, heads, dim]; cos/sin from `neox_tables`.

    x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) folded into the sign
    of the sin table so that one roll replaces the two halves.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def apply_rope_neox_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope_neox` in place (x may be a strided view, e.g. of a fused projection);
    the same ops in the same order, so the same values."""
    rotated = x.roll(x.shape[-1] // 2, dims=-1).mul_(sin)
    return x.mul_(cos).add_(rotated)


def apply_rope_interleave(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek RoPE on interleaved pairs (x0, x1), (x2, x3)...; output de-interleaved as
    [rotated evens, rotated odds] (HF DeepSeek-V3's layout; q and k agree, so scores match)."""
    c = cos[:, None, :]
    s = sin[:, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
