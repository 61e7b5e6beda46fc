"""Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) over the paged KV cache.

State-dict names match HF `LlamaForCausalLM` checkpoints (model.embed_tokens.weight,
model.layers.N.self_attn.q_proj.weight, ..., lm_head.weight) so safetensors load directly;
q/k/v and gate/up run as fused matmuls (models/fused.py maps the names).
Cache layout per token: K (num_kv_heads x head_dim) then V.
"""

from __future__ import annotations

import torch
from torch import nn

from backends.engine.attention import (
    PagedPlan,
    gqa_attention,
    gqa_workspace_decode,
    write_cache,
)
from backends.engine.config import ModelConfig
from backends.engine.decode_workspace import WorkspaceTensor
from backends.engine.models.decoder import DecoderForCausalLM, DecoderLayer
from backends.engine.models.fused import FusedLinear, merge_fused_on_load
from backends.engine.models.layers import SwiGLU
from backends.engine.models.rope import apply_rope_neox_
from backends.engine.triton_fused import fused_usable, rope_neox_


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        parts = (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size))
        self.qkv_proj = FusedLinear(hidden, parts, bias)
        self.o_proj = nn.Linear(q_size, hidden, bias=bias)
        merge_fused_on_load(self)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                slot_mapping: torch.Tensor, plan: PagedPlan, cache: torch.Tensor) -> torch.Tensor:
        num_tokens, q_size = x.shape[0], self.num_heads * self.head_dim
        qkv = self.qkv_proj.fused(x)  # [T, (H + 2 * Hk) * D]: q, k, v
        qk_heads = self.num_heads + self.num_kv_heads
        rotate = rope_neox_ if fused_usable(qkv) else apply_rope_neox_
        rotate(qkv[:, : qk_heads * self.head_dim].view(num_tokens, qk_heads, -1), cos, sin)
        q = qkv[:, :q_size].view(num_tokens, self.num_heads, self.head_dim)
        fresh = qkv[:, q_size:].to(cache.dtype)  # this step's cache rows: K (rotated) then V
        write_cache(cache, slot_mapping, fresh)
        ws = plan.workspace
        if ws is not None and ws.token_index is None:  # decode step
            out = gqa_workspace_decode(q, fresh, cache, ws, self.layer, self.num_kv_heads,
                                       self.scale)
        else:
            out = gqa_attention(q, cache, plan, self.num_kv_heads, self.scale, fresh)
            if ws is not None and ws.token_index is not None:  # a mixed step's decodes
                rows = ws.token_index
                out.index_copy_(0, rows, gqa_workspace_decode(
                    q.index_select(0, rows), fresh.index_select(0, rows), cache, ws,
                    self.layer, self.num_kv_heads, self.scale))
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaForCausalLM(DecoderForCausalLM):
    """CausalLM (see model_api.py). With tied embeddings lm_head shares embed_tokens' weight."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, lambda i: DecoderLayer(
            config, LlamaAttention(config, i),
            SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias)),
            config.head_dim)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype,
                    max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary.neox(positions, dtype, max_len)

    def decode_workspace_layout(self, cache: torch.Tensor) -> tuple[WorkspaceTensor, ...] | None:
        """Decode workspace buffers: K and V, each `[rows, kv_heads, len, head_dim]`."""
        heads = WorkspaceTensor((self.config.num_kv_heads,), (self.config.head_dim,))
        return heads, heads

