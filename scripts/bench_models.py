"""Models for the benchmarks: named real-size Llama shapes with random weights made on the
device (an 8B checkpoint written to disk in fp32 would take most of a device lease), and
transformers' model on the same weights.

Shapes use a byte vocabulary: llama-1b is Llama-3.2-1B's, llama-8b Llama-3.1-8B's. A packaged
model (smollm2-135m-instruct) is the real thing: the engine loads its GGUF, HF its own GGUF load.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from backends.engine.config import parse_model_config
from backends.engine.loader import LoadedModel, build_model, export_preset
from backends.engine.presets import PRESETS
from backends.engine.sources import PACKAGED_MODELS, packaged_model_path
from backends.engine.tokenizer import byte_level_tokenizer

SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}


def shape_config(name: str) -> dict[str, Any]:
    base = dict(PRESETS["tiny-llama"].hf_config)
    base.update(SHAPES[name], max_position_embeddings=8192, rope_theta=500000.0)
    return base


@torch.no_grad()
def random_shape_model(name: str, dtype: torch.dtype, device: str) -> LoadedModel:
    """A real-size Llama shape with random weights made on `device` in `dtype`."""
    config = parse_model_config(shape_config(name))
    with torch.device(device):
        model = build_model(config).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for pname, param in model.named_parameters():
        if pname.endswith("norm.weight"):
            param.fill_(1.0)
        elif "embed_tokens" in pname:
            param.normal_(0.0, 1.0, generator=gen)
        else:
            param.normal_(0.0, param.shape[-1] ** -0.5, generator=gen)
    return LoadedModel(model.eval().requires_grad_(False), byte_level_tokenizer(), config)


def hf_model(name: str, loaded: LoadedModel, dtype: torch.dtype, device: str) -> Any:
    """transformers' model with the engine's weights (state dict names are HF's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name in PACKAGED_MODELS:  # transformers' own GGUF load of the same file
        path = packaged_model_path(name)
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype).to(device).eval()
    if name in PRESETS:
        with tempfile.TemporaryDirectory() as directory:
            export_preset(name, directory)
            return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    config = AutoConfig.for_model(**shape_config(name))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(loaded.model.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"HF weights: missing {result.missing_keys[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    return model.eval()
