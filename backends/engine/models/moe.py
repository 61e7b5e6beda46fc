"""DeepSeek-V2/V3 mixture-of-experts MLP (routed experts + shared experts), as HF computes it.

State-dict names follow transformers 5 (`mlp.gate.weight`, `mlp.gate.e_score_correction_bias`
(V3), `mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I],
`mlp.shared_experts.*`); per-expert checkpoints (`mlp.experts.N.gate_proj.weight`, ...) are
merged into the stacked tensors on load.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backends.engine.config import MoEConfig
from backends.engine.models.layers import SwiGLU


class TopkRouter(nn.Module):
    def __init__(self, moe: MoEConfig, hidden: int) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden))
        bias = torch.zeros(moe.num_experts) if moe.scoring == "sigmoid" else None
        self.e_score_correction_bias: torch.Tensor | None
        self.register_buffer("e_score_correction_bias", bias)

    def _group_mask(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        if moe.topk_group is None or moe.n_group is None:
            raise RuntimeError("grouped routing without n_group/topk_group")
        group_idx = torch.topk(group_scores, k=moe.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        per_group = moe.num_experts // moe.n_group
        return group_mask[:, :, None].expand(-1, -1, per_group).reshape(scores.shape).bool()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, expert ids [T, k]) for tokens x [T, H]."""
        moe = self.moe
        logits = F.linear(x.float(), self.weight.float())
        if moe.scoring == "softmax":
            scores = logits.softmax(dim=-1)
            if moe.topk_method == "group_limited_greedy":
                groups = scores.view(len(x), moe.n_group or 1, -1).max(dim=-1).values
                scores = scores.masked_fill(~self._group_mask(scores, groups), 0.0)
            weights, ids = torch.topk(scores, k=moe.num_experts_per_tok, dim=-1, sorted=False)
        else:
            scores = logits.sigmoid()
            bias = self.e_score_correction_bias
            choice = scores + (bias if bias is not None else 0.0)
            groups = choice.view(len(x), moe.n_group or 1, -1).topk(2, dim=-1)[0].sum(dim=-1)
            choice = choice.masked_fill(~self._group_mask(choice, groups), float("-inf"))
            ids = torch.topk(choice, k=moe.num_experts_per_tok, dim=-1, sorted=False)[1]
            weights = scores.gather(1, ids)
            if moe.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * moe.routed_scaling_factor, ids


class Experts(nn.Module):
    def __init__(self, moe: MoEConfig, hidden: int) -> None:
        super().__init__()
        size = moe.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(moe.num_experts, 2 * size, hidden))
        self.down_proj = nn.Parameter(torch.empty(moe.num_experts, hidden, size))
        self.register_load_state_dict_pre_hook(_stack_per_expert)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.gate_up_proj.shape[0]).tolist()
        token_of = order // ids.shape[1]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            picks = order[start:start + count]
            tokens = token_of[start:start + count]
            start += count
            gate, up = F.linear(x[tokens], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert])
            y = y * weights.flatten()[picks, None].to(y.dtype)
            out.index_add_(0, tokens, y)
        return out


def _stack_per_expert(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Turn `experts.N.{gate,up,down}_proj.weight` keys into the stacked tensors."""
    if not isinstance(module, Experts) or f"{prefix}0.gate_proj.weight" not in state:
        return
    num = module.gate_up_proj.shape[0]
    gate_up, down = [], []
    for e in range(num):
        gate = state.pop(f"{prefix}{e}.gate_proj.weight")
        up = state.pop(f"{prefix}{e}.up_proj.weight")
        gate_up.append(torch.cat((gate, up)))
        down.append(state.pop(f"{prefix}{e}.down_proj.weight"))
    state[prefix + "gate_up_proj"] = torch.stack(gate_up)
    state[prefix + "down_proj"] = torch.stack(down)


class DeepseekMoE(nn.Module):
    def __init__(self, moe: MoEConfig, hidden: int, mlp_bias: bool) -> None:
        super().__init__()
        self.gate = TopkRouter(moe, hidden)
        self.experts = Experts(moe, hidden)
        self.shared_experts = SwiGLU(
            hidden, moe.moe_intermediate_size * moe.num_shared_experts, mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        return self.experts(x, weights, ids) + self.shared_experts(x)
