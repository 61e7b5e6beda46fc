"""DeepSeek-V2/V3-style decoder (MLA attention; dense SwiGLU or MoE MLPs) over the paged
latent cache. Parameter names match HF `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM`.
"""

from __future__ import annotations

import torch
from torch import nn

from backends.engine.config import ModelConfig
from backends.engine.decode_workspace import WorkspaceTensor
from backends.engine.flashmla import flash_mla_usable
from backends.engine.models.decoder import DecoderForCausalLM, DecoderLayer
from backends.engine.models.layers import SwiGLU
from backends.engine.models.mla import MLAttention
from backends.engine.models.moe import DeepseekMoE


def _deepseek_layer(config: ModelConfig, layer: int) -> DecoderLayer:
    moe = config.moe
    mlp: nn.Module
    if moe is not None and layer >= moe.first_k_dense_replace:
        mlp = DeepseekMoE(moe, config.hidden_size, config.mlp_bias)
    else:
        mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias)
    return DecoderLayer(config, MLAttention(config, layer), mlp)


class DeepseekForCausalLM(DecoderForCausalLM):
    """CausalLM (see model_api.py) with kv_width = kv_lora_rank + qk_rope_head_dim."""

    def __init__(self, config: ModelConfig) -> None:
        if config.mla is None:
            raise ValueError(f"architecture {config.architecture!r} has no MLA config")
        super().__init__(config, lambda i: _deepseek_layer(config, i),
                         config.mla.qk_rope_head_dim)
        # the expert loop reads per-expert token counts on the host
        self.graph_capturable = not any(
            isinstance(layer.mlp, DeepseekMoE) for layer in self.model.layers)

    def decode_workspace_layout(self, cache: torch.Tensor) -> tuple[WorkspaceTensor, ...] | None:
        """One latent buffer `[rows, len, kv_width]`; None where FlashMLA reads the paged
        cache directly."""
        mla = self.config.mla
        if mla is None or flash_mla_usable(cache, mla.kv_lora_rank, mla.qk_rope_head_dim):
            return None
        return (WorkspaceTensor((), (self.kv_width,)),)

