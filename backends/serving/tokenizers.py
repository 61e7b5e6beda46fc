"""The orchestrator's tokenizer: the same one the workers' engines load, without the weights."""

from __future__ import annotations

from backends.engine.loader import load_tokenizer

__all__ = ["load_tokenizer"]
