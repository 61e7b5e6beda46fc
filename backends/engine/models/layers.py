"""Building blocks shared by the models: RMSNorm and the SwiGLU MLP.

Numerics follow transformers' Llama / DeepSeek modules (float32 norm statistics, float32
rotary angles cast to the activation dtype) so logits match HF on the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backends.engine.models.fused import FusedLinear, merge_fused_on_load
from backends.engine.triton_fused import fused_usable, silu_mul

_FUSED_NORM_DTYPES = (torch.bfloat16, torch.float16)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in _FUSED_NORM_DTYPES and self.weight.dtype == x.dtype:
            # one fused kernel (float32 statistics) instead of seven; the product is rounded
            # once instead of twice, so bf16/fp16 values may differ from HF's in the last bit
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # HF's ops in HF's order (statistics in float32, cast back, scale in the activation
        # dtype); for small float32 batches this is also cheaper than F.rms_norm's composite.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def input_major_linear_weights(model: nn.Module) -> None:
    """Re-lay every linear weight `[out, in]` as the transpose of a contiguous `[in, out]`
    tensor: same shapes and values (state dicts and checkpoints are unchanged), but on CPU
    `x @ W.T` then runs as a plain, faster GEMM. Idempotent; weights shared with an
    embedding (tied lm_head) keep their row-major layout for the lookup."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.Linear, FusedLinear)):
                continue
            weight = module.weight
            if id(weight) in embedded or weight.dim() != 2 or weight.stride(0) == 1:
                continue
            weight.data = weight.data.t().contiguous().t()


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); state-dict names match HF's LlamaMLP (gate/up are fused)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        parts = (("gate_proj", intermediate), ("up_proj", intermediate))
        self.gate_up_proj = FusedLinear(hidden, parts, bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        merge_fused_on_load(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_usable(x):  # one kernel for the activation (CUDA bf16/fp16)
            return self.down_proj(silu_mul(self.gate_up_proj.fused(x)))
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)
