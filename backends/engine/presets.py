"""Built-in presets: tiny models with deterministic random weights and a byte-level tokenizer.

Weights come from a seeded `torch.Generator` in float32, visited in sorted parameter-name
order, so the same preset gives bit-identical weights on every machine. Scales are chosen so
logits are far from uniform (greedy output is not constant): unit-variance embeddings,
1/sqrt(fan_in) projections, norms near 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from backends.engine.tokenizer import BYTE_SPECIALS, NUM_BYTES

BYTE_VOCAB_SIZE = len(BYTE_SPECIALS) + NUM_BYTES
_COMMON: dict[str, Any] = {
    "vocab_size": BYTE_VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.02,
    "use_cache": True,
}


@dataclass(frozen=True, slots=True)
class PresetSpec:
    """A preset: its HF config.json content (read-only) and its weight seed."""

    name: str
    hf_config: Mapping[str, Any]
    seed: int


def _spec(name: str, seed: int, extra: dict[str, Any]) -> PresetSpec:
    return PresetSpec(name, MappingProxyType({**_COMMON, **extra}), seed)


PRESETS: Mapping[str, PresetSpec] = MappingProxyType({
    "tiny-llama": _spec("tiny-llama", 1234, {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_key_value_heads": 2,
        "head_dim": 32,
        "mlp_bias": False,
        "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
        },
    }),
    "tiny-mla": _spec("tiny-mla", 4321, {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "rope_interleave": True,
        "rope_scaling": None,
        "first_k_dense_replace": 4,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "n_group": 1,
        "topk_group": 1,
    }),
})


def get_preset(name: str) -> PresetSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]


def init_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter deterministically from `seed` (sorted names; tied ones once)."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    tensors = [*model.named_parameters(remove_duplicate=False), *(
        (name, buf) for name, buf in model.named_buffers() if name.endswith("correction_bias"))]
    with torch.no_grad():
        for name, param in sorted(tensors, key=lambda item: item[0]):
            if id(param) in seen:
                continue
            seen.add(id(param))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * noise
            elif name.endswith("correction_bias"):
                value = 0.1 * noise
            elif name.endswith("bias"):
                value = 0.02 * noise
            elif "embed_tokens" in name:
                value = noise
            else:
                value = noise / math.sqrt(param.shape[-1])
            param.copy_(value.to(param.dtype))
