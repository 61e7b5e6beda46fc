"""DeepSeek multi-head latent attention (MLA) over a paged latent cache.

Cache per token: the normalized compressed latent (kv_lora_rank) then the rope'd shared key
(qk_rope_head_dim) -- FlashMLA's layout. Parameter names match HF DeepSeek-V2/V3.
Prefill expands the latents through kv_b_proj (as HF does); decode uses the absorbed form:
q_nope is folded into latent space with W_UK, attention runs over the latent cache as one
shared KV head, and W_UV maps the result back to per-head values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backends.engine.attention import (
    PagedPlan,
    gather_blocks,
    sdpa_span,
    span_entries,
    write_cache,
)
from backends.engine.config import MLAConfig, ModelConfig
from backends.engine.decode_workspace import WorkspaceStep, update
from backends.engine.flashmla import flash_mla_decode, flash_mla_usable
from backends.engine.models.fused import FusedLinear, merge_fused_on_load
from backends.engine.models.layers import RMSNorm
from backends.engine.models.rope import (
    apply_rope_interleave,
    apply_rope_neox,
    neox_tables,
    yarn_mscale,
)
from backends.engine.triton_decode import paged_mla_decode, triton_decode_usable

# HF builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(config: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under yarn (as HF DeepSeek)."""
    if config.mla is None:
        raise RuntimeError("mla_softmax_scale needs config.mla")
    scale = config.mla.qk_head_dim**-0.5
    rope = config.rope
    if rope.rope_type != "default" and rope.mscale_all_dim:
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        mla = config.mla
        if mla is None:
            raise RuntimeError("MLAttention needs config.mla")
        self.mla: MLAConfig = mla
        self.num_heads = config.num_heads
        self.scale = mla_softmax_scale(config)
        hidden, bias, heads = config.hidden_size, config.attention_bias, config.num_heads
        self.q_proj: nn.Linear | None = None
        self.kv_a_proj_with_mqa: nn.Linear | None = None
        self.qkv_a_proj: FusedLinear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: nn.Linear | None = None
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * mla.qk_head_dim, bias=False)
            self.kv_a_proj_with_mqa = nn.Linear(
                hidden, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=bias)
        else:
            parts = (("q_a_proj", mla.q_lora_rank),
                     ("kv_a_proj_with_mqa", mla.kv_lora_rank + mla.qk_rope_head_dim))
            self.qkv_a_proj = FusedLinear(hidden, parts, bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, heads * mla.qk_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * mla.v_head_dim, hidden, bias=bias)
        self.rope_interleave = mla.rope_interleave
        merge_fused_on_load(self)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [T, H * qk_head_dim], compressed kv [T, kv_lora_rank + rope]) of the input."""
        if self.q_proj is not None and self.kv_a_proj_with_mqa is not None:
            return self.q_proj(x), self.kv_a_proj_with_mqa(x)
        if self.qkv_a_proj is None or self.q_a_layernorm is None or self.q_b_proj is None:
            raise RuntimeError("MLAttention without q projections")
        q_a, kv_a = self.qkv_a_proj(x)
        return self.q_b_proj(self.q_a_layernorm(q_a)), kv_a

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                slot_mapping: torch.Tensor, plan: PagedPlan, cache: torch.Tensor) -> torch.Tensor:
        mla, num_tokens = self.mla, x.shape[0]
        q, kv_a = self._project(x)
        q_nope, q_pe = q.view(num_tokens, self.num_heads, mla.qk_head_dim).split(
            [mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        latent, k_pe = kv_a.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = self._rope(q_pe, k_pe, cos, sin)
        fresh = torch.cat((latent, k_pe), dim=-1).to(cache.dtype)
        write_cache(cache, slot_mapping, fresh)
        ws = plan.workspace
        if ws is not None and ws.token_index is None:  # decode step
            out = self._decode_workspace(q_nope, q_pe, fresh, cache, ws)
        elif plan.decode_only:
            out = self._decode_absorbed(q_nope, q_pe, cache, plan)
        else:
            out = self._prefill_expanded(torch.cat((q_nope, q_pe), dim=-1), cache, plan, fresh)
            if ws is not None and ws.token_index is not None:  # a mixed step's decodes
                rows = ws.token_index
                out.index_copy_(0, rows, self._decode_workspace(
                    q_nope.index_select(0, rows), q_pe.index_select(0, rows),
                    fresh.index_select(0, rows), cache, ws))
        return self.o_proj(out.reshape(num_tokens, -1))

    def _rope(self, q_pe: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_pe [T, H, rope], k_pe [T, rope]: rotated together (one shared key head)."""
        both = torch.cat((q_pe, k_pe[:, None, :]), dim=1)
        if self.rope_interleave:
            both = apply_rope_interleave(both, cos, sin)
        else:
            both = apply_rope_neox(both, *neox_tables(cos, sin))
        return both[:, : self.num_heads], both[:, self.num_heads]

    def _absorb_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, R] and W_UV [H, v, R] as views of kv_b_proj.weight."""
        mla = self.mla
        w = self.kv_b_proj.weight.view(
            self.num_heads, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank)
        return w[:, : mla.qk_nope_head_dim], w[:, mla.qk_nope_head_dim:]

    def _decode_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                         plan: PagedPlan) -> torch.Tensor:
        """One query per sequence: [B, H, *] -> [B, H, v_head_dim] over the latent cache."""
        w_uk, w_uv = self._absorb_weights()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, R]
        q_full = torch.cat((q_latent, q_pe), dim=-1)  # [B, H, R + rope]
        rank = self.mla.kv_lora_rank
        if flash_mla_usable(cache, rank, self.mla.qk_rope_head_dim):
            if plan.block_ids is None or plan.context_lens is None:
                raise RuntimeError("decode plan without block ids")
            out_latent = flash_mla_decode(
                q_full, cache, plan.block_ids, plan.context_lens, rank, self.scale)
            return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        if cache.is_cuda and triton_decode_usable(q_full, cache):
            if plan.block_ids is None or plan.context_lens is None:
                raise RuntimeError("decode plan without block ids")
            out_latent = paged_mla_decode(
                q_full, cache, plan.block_ids, plan.context_lens, rank, self.scale)
            return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        return mla_decode_torch(q_full, cache, plan, rank, self.scale, w_uv)

    def _decode_workspace(self, q_nope: torch.Tensor, q_pe: torch.Tensor, fresh: torch.Tensor,
                          cache: torch.Tensor, step: WorkspaceStep) -> torch.Tensor:
        """Absorbed decode over the workspace's latent rows `[rows, len, R + rope]`."""
        w_uk, w_uv = self._absorb_weights()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, R]
        q_full = torch.cat((q_latent, q_pe), dim=-1)  # [B, H, R + rope]
        (entries,) = update(step, self.layer, cache, (fresh,), lambda rows: (rows,))
        if not step.identity:
            q_full = q_full.new_zeros(step.num_rows, *q_full.shape[1:]).index_copy_(
                0, step.slots, q_full)
        bias = None if step.bias is None else step.bias[:, 0]
        out_latent = latent_attention(q_full, entries, bias, self.mla.kv_lora_rank, self.scale)
        if not step.identity:
            out_latent = out_latent.index_select(0, step.slots)
        return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def _expand(self, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows [..., R + rope] -> per-head keys [..., H, qk_head] and values [..., H, v]."""
        mla = self.mla
        kv = self.kv_b_proj(entries[..., : mla.kv_lora_rank]).unflatten(
            -1, (self.num_heads, mla.qk_nope_head_dim + mla.v_head_dim))
        k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        k_pe = entries[..., None, mla.kv_lora_rank:].expand(*k_nope.shape[:-1], -1)
        return torch.cat((k_nope, k_pe), dim=-1), v

    def _prefill_expanded(self, q: torch.Tensor, cache: torch.Tensor, plan: PagedPlan,
                          fresh: torch.Tensor) -> torch.Tensor:
        if plan.uniform_len:  # fresh equal-length prompts: one batched causal attention
            batch, length = q.shape[0] // plan.uniform_len, plan.uniform_len
            k, v = self._expand(fresh.view(batch, length, -1))
            out = F.scaled_dot_product_attention(
                q.view(batch, length, self.num_heads, -1).transpose(1, 2), k.transpose(1, 2),
                v.transpose(1, 2), is_causal=True, scale=self.scale)
            return out.transpose(1, 2).reshape(q.shape[0], self.num_heads, -1)
        out = q.new_empty(q.shape[0], self.num_heads, self.mla.v_head_dim)
        for span in plan.spans:
            k, v = self._expand(span_entries(cache, span, fresh))
            out[span.query_start:span.query_end] = sdpa_span(
                q[span.query_start:span.query_end], k, v, span, self.scale)
        return out


def mla_decode_torch(q_full: torch.Tensor, cache: torch.Tensor, plan: PagedPlan,
                     kv_lora_rank: int, scale: float, w_uv: torch.Tensor) -> torch.Tensor:
    """Absorbed MLA decode: q_full [B, H, R + rope] over gathered latents -> [B, H, v]."""
    if plan.block_ids is None or plan.bias is None:
        raise RuntimeError("decode plan without block ids")
    entries = gather_blocks(cache, plan.block_ids)  # [B, L, R + rope]
    out_latent = latent_attention(q_full, entries, plan.bias[:, 0], kv_lora_rank, scale)
    return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


def latent_attention(q_full: torch.Tensor, entries: torch.Tensor, bias: torch.Tensor | None,
                     kv_lora_rank: int, scale: float) -> torch.Tensor:
    """One shared latent head: q_full [B, H, R + rope] over entries [B, L, R + rope] with an
    additive bias [B, 1, L] (or None) -> [B, H, R]."""
    keys = entries.transpose(1, 2)
    if bias is None:
        scores = torch.bmm(q_full, keys).mul_(scale)
    else:
        scores = torch.baddbmm(bias, q_full, keys, alpha=scale)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_full.dtype)  # [B, H, L]
    return torch.bmm(probs, entries[..., :kv_lora_rank])
