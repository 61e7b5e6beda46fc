"""A linear layer that computes several HF projections with one matmul.

`FusedLinear(parts=(("q_proj", n_q), ("k_proj", n_k), ...))` holds one weight whose rows are the
parts in order. Its state dict uses the HF names of the parts (siblings of the fused module,
e.g. `...self_attn.q_proj.weight`), so checkpoints load and export unchanged. Loading needs the
parent's cooperation (torch hands a child only keys under the child's own prefix): a module
holding FusedLinear children calls `merge_fused_on_load(self)` in its __init__.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class FusedLinear(nn.Module):
    def __init__(self, in_features: int, parts: tuple[tuple[str, int], ...], bias: bool) -> None:
        super().__init__()
        self.parts = parts
        self.sizes = [size for _, size in parts]
        total = sum(self.sizes)
        self.weight = nn.Parameter(torch.empty(total, in_features))
        self.bias = nn.Parameter(torch.zeros(total)) if bias else None
        self.register_state_dict_post_hook(_split_state)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.fused(x).split(self.sizes, dim=-1))

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """All parts side by side, `[..., sum(sizes)]` (parts in order)."""
        return F.linear(x, self.weight, self.bias)


def _parent(prefix: str) -> str:
    """'model.layers.0.self_attn.qkv.' -> 'model.layers.0.self_attn.'"""
    stripped = prefix[:-1]
    return stripped.rsplit(".", 1)[0] + "." if "." in stripped else ""


def _split_state(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    if not isinstance(module, FusedLinear):
        raise RuntimeError("state hook on a non-FusedLinear module")
    parent = _parent(prefix)
    for kind in ("weight", "bias"):
        fused = state.pop(prefix + kind, None)
        if fused is None:
            continue
        for (name, _), piece in zip(module.parts, fused.split(module.sizes), strict=True):
            state[f"{parent}{name}.{kind}"] = piece


def merge_fused_on_load(parent: nn.Module) -> None:
    """Make `parent.load_state_dict` accept HF part names for its FusedLinear children."""
    parent.register_load_state_dict_pre_hook(_merge_children)


def _merge_children(parent: nn.Module, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    for child_name, child in parent.named_children():
        if not isinstance(child, FusedLinear):
            continue
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name, _ in child.parts]
            if all(key in state for key in keys):
                state[f"{prefix}{child_name}.{kind}"] = torch.cat([state.pop(key) for key in keys])
