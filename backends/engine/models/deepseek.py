"""DeepSeek-V2/V3-style decoder (MLA attention; dense SwiGLU or MoE MLPs) over the paged
latent cache. Parameter names match HF `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM`.
"""

from __future__ import annotations

import torch
from torch import nn

from backends.engine.attention import PagedPlan, build_plan
from backends.engine.config import ModelConfig
from backends.engine.decode_workspace import WorkspaceTensor
from backends.engine.flashmla import flash_mla_usable
from backends.engine.model_api import AttentionMetadata
from backends.engine.models.layers import RMSNorm, SwiGLU
from backends.engine.models.mla import MLAttention
from backends.engine.models.moe import DeepseekMoE
from backends.engine.models.rope import RotaryEmbedding


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = MLAttention(config, layer)
        moe = config.moe
        self.mlp: nn.Module
        if moe is not None and layer >= moe.first_k_dense_replace:
            self.mlp = DeepseekMoE(moe, config.hidden_size, config.mlp_bias)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                slot_mapping: torch.Tensor, plan: PagedPlan, cache: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, slot_mapping, plan, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DeepseekDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """CausalLM (see model_api.py) with kv_width = kv_lora_rank + qk_rope_head_dim."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.mla is None:
            raise ValueError(f"architecture {config.architecture!r} has no MLA config")
        self.config = config
        self.num_layers = config.num_layers
        self.kv_width = config.kv_width
        self.model = DeepseekModel(config)
        self.rotary = RotaryEmbedding(config.rope, config.mla.qk_rope_head_dim)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"kv_caches: expected {self.num_layers} layers, got {len(kv_caches)}")
        plan = build_plan(meta, kv_caches[0].shape[1], kv_caches[0].dtype)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype, meta.max_context_len)
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            h = layer(h, cos, sin, slot_mapping=meta.slot_mapping, plan=plan, cache=cache)
        return self.model.norm(h)

    def decode_workspace_layout(self, cache: torch.Tensor) -> tuple[WorkspaceTensor, ...] | None:
        """One latent buffer `[rows, len, kv_width]`; None where FlashMLA reads the paged
        cache directly."""
        mla = self.config.mla
        if mla is None or flash_mla_usable(cache, mla.kv_lora_rank, mla.qk_rope_head_dim):
            return None
        return (WorkspaceTensor((), (self.kv_width,)),)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
