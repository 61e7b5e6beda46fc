"""The orchestrator's tokenizer: the same one the workers' engines load, without the weights."""

from __future__ import annotations

from pathlib import Path

from backends.engine.presets import PRESETS
from backends.engine.tokenizer import Tokenizer, byte_level_tokenizer


def load_tokenizer(source: str) -> Tokenizer:
    """Presets use the byte-level tokenizer; a checkpoint directory its tokenizer.json."""
    if source in PRESETS:
        return byte_level_tokenizer()
    if not Path(source).is_dir():
        raise ValueError(f"source {source!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                         "nor a checkpoint directory")
    return Tokenizer.from_dir(source)
