"""The decoder skeleton both model families share: pre-norm residual layers, the HF-named
module tree (model.embed_tokens / model.layers.N / model.norm / lm_head), the paged forward.

Subclasses supply the attention module (via ``make_attention``) and the rotary tables;
parameter names stay those of HF checkpoints so safetensors load directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from backends.engine.attention import PagedPlan, build_plan
from backends.engine.config import ModelConfig
from backends.engine.model_api import AttentionMetadata
from backends.engine.models.layers import RMSNorm
from backends.engine.models.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                slot_mapping: torch.Tensor, plan: PagedPlan, cache: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, slot_mapping, plan, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """HF's ``model``: embeddings, the layers, the final norm."""

    def __init__(self, config: ModelConfig, make_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """CausalLM (see model_api.py) over a DecoderModel. With tied embeddings lm_head shares
    embed_tokens' weight."""

    def __init__(self, config: ModelConfig, make_layer: Callable[[int], nn.Module],
                 rotary_dim: int) -> None:
        super().__init__()
        self.config = config
        self.num_layers = config.num_layers
        self.kv_width = config.kv_width
        self.model = DecoderModel(config, make_layer)
        # a decode step without host synchronisation, so CUDA graphs can capture it
        self.graph_capturable = True
        self.rotary = RotaryEmbedding(config.rope, rotary_dim)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype,
                    max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for this step's positions, in the layout the attention modules expect."""
        return self.rotary(positions, dtype, max_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"kv_caches: expected {self.num_layers} layers, got {len(kv_caches)}")
        plan = build_plan(meta, kv_caches[0].shape[1], kv_caches[0].dtype)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope_tables(positions, h.dtype, meta.max_context_len)
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            h = layer(h, cos, sin, meta.slot_mapping, plan, cache)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
