"""Fused elementwise Triton kernels for the GPU's half-precision path: rotary (neox) in place on
the fused q/k projection, and SiLU(gate) * up.

Each replaces several PyTorch kernels (rotary: roll, two multiplies and an add; SwiGLU's
activation: silu and a multiply) with one, computing in float32 and rounding once, so values
may differ from the unfused ops in the last bit. The models use them only for CUDA tensors in
bfloat16/float16 (`fused_usable`); float32 and CPU keep HF's op order (exactness tests).
Triton is imported lazily through `triton_decode` (its interpreter rules apply).
"""

from __future__ import annotations

from typing import Any

import torch

from backends.engine import triton_decode

tl: Any = None  # bound from triton_decode on first use (the kernels' `tl`)

FUSED_DTYPES = (torch.bfloat16, torch.float16)


def _bind() -> bool:
    global tl
    if not triton_decode._load_triton():
        return False
    tl = triton_decode.tl
    return True


# Below this many tokens an eager step keeps PyTorch's ops: one Triton launch costs more host
# time than the few small kernels it replaces (inside triton_decode.graph_kernels, any size).
FUSED_MIN_TOKENS = 256


def fused_usable(x: torch.Tensor) -> bool:
    """True for CUDA bf16/fp16 tensors where Triton runs compiled, in a graph-replayed step
    or with at least FUSED_MIN_TOKENS rows."""
    return (x.is_cuda and x.dtype in FUSED_DTYPES
            and (x.shape[0] >= FUSED_MIN_TOKENS or triton_decode.graph_kernels_active())
            and triton_decode.triton_decode_available(x.device) and _bind())


def _rope_neox_kernel(x_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ct, num_heads,
                      HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr):
    token = tl.program_id(0)
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    rolled = (dims + HEAD_DIM // 2) % HEAD_DIM
    mask = (heads < num_heads)[:, None]
    rows = x_ptr + token * stride_xt + heads[:, None] * stride_xh
    x = tl.load(rows + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    x_rot = tl.load(rows + rolled[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * stride_ct + dims).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_ct + dims).to(tl.float32)
    out = x * cos[None, :] + x_rot * sin[None, :]
    tl.store(rows + dims[None, :], out.to(x_ptr.dtype.element_ty), mask=mask)


def rope_neox_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotary.apply_rope_neox_` in one kernel: x [T, heads, dim] (a strided view whose last
    dimension is contiguous), cos/sin [T, 1, dim] from `neox_tables` (sin sign-folded)."""
    num_tokens, num_heads, head_dim = x.shape
    if head_dim & (head_dim - 1) or x.stride(-1) != 1:
        raise ValueError(f"rope_neox_: head_dim must be a power of two with x contiguous in it, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")
    cos = cos.reshape(num_tokens, head_dim)
    sin = sin.reshape(num_tokens, head_dim)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if num_tokens:
        _jit(_rope_neox_kernel)[(num_tokens,)](
            x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), num_heads,
            HEAD_DIM=head_dim, HEADS_PAD=max(1, 1 << (num_heads - 1).bit_length()))
    return x


def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, width,
                     BLOCK: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    row = gate_up_ptr + token * stride_in
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + width + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + token * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2 * width] (gate then up) -> [T, width]."""
    num_tokens, double = gate_up.shape
    if double % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"silu_mul: gate_up must be [T, 2 * width] contiguous in its last "
                         f"dimension, got shape {tuple(gate_up.shape)}")
    width = double // 2
    out = gate_up.new_empty(num_tokens, width)
    block = 1024
    if num_tokens:
        _jit(_silu_mul_kernel)[(num_tokens, -(-width // block))](
            gate_up, out, gate_up.stride(0), out.stride(0), width, BLOCK=block)
    return out


def _jit(fn: Any) -> Any:
    if not _bind():
        raise RuntimeError("triton is not installed")
    return triton_decode._jit(fn, triton_decode.triton_interpreting())
