"""Load a model + tokenizer from any source (sources.py: a preset, a packaged model, a .gguf
file, an HF checkpoint directory); export presets.

A GGUF file is converted once into a cached checkpoint directory (gguf_loader.py) and then
loaded like any checkpoint. `load_model` raises ValueError naming the value for an unknown
source, a directory missing files, a GGUF it cannot read, or an unsupported architecture
(through `parse_model_config`).
`export_preset` writes a normal HF checkpoint directory that `transformers` loads with the
same weights, which is how tests get their oracle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from backends.engine.config import LLAMA, ModelConfig, parse_model_config
from backends.engine.gguf_loader import converted_checkpoint
from backends.engine.presets import get_preset, init_weights
from backends.engine.sources import SourceKind, resolve_source
from backends.engine.tokenizer import Tokenizer, byte_level_tokenizer, byte_level_tokenizer_config

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model (implements model_api.CausalLM) on its device in eval mode, with its tokenizer."""

    model: nn.Module
    tokenizer: Tokenizer
    config: ModelConfig


def build_model(config: ModelConfig) -> nn.Module:
    """An uninitialized model module for `config`'s architecture."""
    if config.architecture == LLAMA:
        from backends.engine.models.llama import LlamaForCausalLM

        return LlamaForCausalLM(config)
    from backends.engine.models.deepseek import DeepseekForCausalLM

    return DeepseekForCausalLM(config)


def load_model(source: str, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """`source`: see sources.resolve_source. A GGUF's first load converts it (slow once)."""
    resolved = resolve_source(source, field="source")
    if resolved.kind is SourceKind.PRESET:
        return _load_preset(source, dtype, device)
    return _load_checkpoint(checkpoint_dir(source), dtype, device)


def checkpoint_dir(source: str) -> Path:
    """The checkpoint directory of a non-preset source (a GGUF's converted cache, made now if
    needed); ValueError for presets and unknown sources."""
    resolved = resolve_source(source, field="source")
    if resolved.kind is SourceKind.PRESET:
        raise ValueError(f"source: {source!r} is a preset, it has no checkpoint directory")
    if resolved.kind is SourceKind.GGUF:
        return converted_checkpoint(resolved.location)
    return Path(resolved.location)


def load_tokenizer(source: str) -> Tokenizer:
    """The tokenizer `load_model(source)` would load, without the weights."""
    if resolve_source(source, field="source").kind is SourceKind.PRESET:
        return byte_level_tokenizer()
    path = checkpoint_dir(source)
    eos = parse_model_config(_read_json(path / "config.json")).eos_token_ids
    return Tokenizer.from_dir(path, eos_fallback_id=eos[0] if eos else None)


def _finish(model: nn.Module, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _load_preset(name: str, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    spec = get_preset(name)
    config = parse_model_config(spec.hf_config)
    model = build_model(config)
    init_weights(model, spec.seed)
    return LoadedModel(_finish(model, dtype, device), byte_level_tokenizer(), config)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"checkpoint directory {str(path.parent)!r}: missing file {path.name!r}")
    return json.loads(path.read_text())


def _load_checkpoint(path: Path, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    raw = _read_json(path / "config.json")
    config = parse_model_config(raw)
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"checkpoint directory {str(path)!r}: missing file '*.safetensors'")
    eos = config.eos_token_ids[0] if config.eos_token_ids else None
    tokenizer = Tokenizer.from_dir(path, eos_fallback_id=eos)
    model = build_model(config).to(dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    _load_state(model, state, config, path)
    return LoadedModel(_finish(model, dtype, device), tokenizer, config)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], config: ModelConfig,
                path: Path) -> None:
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings
                                                       and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint directory {str(path)!r}: weights do not match {config.architecture}: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def export_preset(name: str, directory: str | Path) -> Path:
    """Write preset `name` as an HF checkpoint dir (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, generation_config.json). Creates `directory`; overwrites those files."""
    spec = get_preset(name)
    return export_checkpoint(spec.hf_config, spec.seed, directory)


def export_checkpoint(hf_config: Mapping[str, Any], seed: int, directory: str | Path) -> Path:
    """Like export_preset for any byte-vocabulary config dict (tests use variants)."""
    config = parse_model_config(hf_config)
    model = build_model(config)
    init_weights(model, seed)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(
        json.dumps({**hf_config, "torch_dtype": "float32"}, indent=2, sort_keys=True))
    tokenizer = byte_level_tokenizer()
    tokenizer.save(out)
    tok_cfg = byte_level_tokenizer_config(config.max_position_embeddings)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": 0, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out
