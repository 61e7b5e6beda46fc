"""Triton-language paged decode attention (GQA and absorbed MLA), used only where `triton`
imports and either CUDA is present or Triton's CPU interpreter is on (`TRITON_INTERPRET=1`).

Both kernels read the engine's paged cache in place (`[num_blocks, block_size, kv_width]`,
docs/contracts.md), one query token per sequence: a program walks its sequence's block table
`tile_tokens` tokens at a time with an online softmax in fp32, so no gather copy is made.
- GQA: grid (batch, kv_head); the `num_heads // num_kv_heads` query heads sharing a KV head
  (head h reads KV head h // group, as HF's repeat_kv) ride as the rows of one tile, so each
  K/V tile is loaded once per group.
- MLA: grid (batch, head tiles); scores = q_latent . latent + q_rope . k_rope over the single
  shared latent head; the output stays in latent space (the caller applies W_UV), exactly
  what `flash_mla_decode` returns.
Neither kernel modifies the cache, the block tables or the queries. Kernels are jitted lazily
(keyed by the interpreter flag) so that a test may switch the interpreter on at run time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

# Imported on first use, not at module import: Triton's CPU interpreter only works when
# TRITON_INTERPRET=1 is set before `triton` is first imported, and importing this module
# (e.g. from attention.py) must not decide that for the whole process.
_triton: Any = None
tl: Any = None  # the kernels' `tl`, bound by _load_triton()


def _load_triton() -> bool:
    """Import triton once; False when it is not installed."""
    global _triton, tl
    if _triton is None and importlib.util.find_spec("triton") is not None:
        tl = importlib.import_module("triton.language")
        _triton = importlib.import_module("triton")
    return _triton is not None


TRITON_DECODE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_DOT = 16  # tl.dot needs every dimension >= 16
_LOG2E = 1.4426950408889634


def triton_interpreting() -> bool:
    """True when Triton's CPU interpreter is on: TRITON_INTERPRET=1 now, and it was already
    set when triton was first imported (else triton's own jitted helpers are compiled-mode
    objects that fail inside an interpreted kernel). Imports triton only when the variable
    is set, so CPU-only callers never pay for the import."""
    if os.environ.get("TRITON_INTERPRET", "").lower() not in ("1", "true", "yes", "on", "y"):
        return False
    if not _load_triton() or not _triton.knobs.runtime.interpret:
        return False
    return type(tl.zeros).__name__ == "InterpretedFunction"


def triton_decode_available(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device` (CUDA, or CPU under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and _load_triton() and not triton_interpreting()
    return device.type == "cpu" and triton_interpreting()


def triton_decode_usable(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether `paged_gqa_decode` / `paged_mla_decode` can serve this query and cache."""
    block_size = cache.shape[1]
    return (
        triton_decode_available(cache.device)
        and q.device == cache.device
        and q.dtype == cache.dtype
        and cache.dtype in TRITON_DECODE_DTYPES
        and block_size >= _MIN_DOT
        and block_size & (block_size - 1) == 0
    )


def _pad(n: int) -> int:
    return max(_MIN_DOT, 1 << (n - 1).bit_length())


def _gqa_decode_kernel(q_ptr, cache_ptr, tables_ptr, lens_ptr, out_ptr, part_ptr, stats_ptr,
                       stride_qb, stride_qh, stride_cb, stride_ct, stride_tb, stride_ob,
                       stride_oh, scale_log2, kv_dim, split_len,
                       GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                       DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                       NUM_SPLITS: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    toks = tl.arange(0, TILE)
    q_mask = (rows < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=q_mask, other=0.0)
    ctx_len = tl.load(lens_ptr + seq).to(tl.int32)
    lo = split * split_len
    hi = tl.minimum(ctx_len, lo + split_len)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    head_cols = kv_head * HEAD_DIM + dims
    for start in range(lo, hi, TILE):
        # a tile may span several blocks: each token finds its block in the table
        pos = start + toks
        tok_ok = pos < hi
        blocks = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=tok_ok,
                         other=0).to(tl.int64)
        rows_ptr = (cache_ptr + blocks[:, None] * stride_cb
                    + (pos % BLOCK_SIZE)[:, None] * stride_ct + head_cols[None, :])
        kv_mask = tok_ok[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(rows_ptr, mask=kv_mask, other=0.0)
        v = tl.load(rows_ptr + kv_dim, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # partials [B, H, NUM_SPLITS, DIM_PAD] and (max, sum) stats [B, H, NUM_SPLITS, 2]
        slot = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
        tl.store(part_ptr + slot[:, None] * DIM_PAD + dims[None, :], acc,
                 mask=(rows < GROUP)[:, None])
        tl.store(stats_ptr + slot * 2, m_i, mask=rows < GROUP)
        tl.store(stats_ptr + slot * 2 + 1, l_i, mask=rows < GROUP)


def _combine_splits_kernel(part_ptr, stats_ptr, out_ptr, stride_ob, stride_oh,
                           HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                           NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """out[b, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (empty splits: m = -inf)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    slot = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits
    ok = splits < NUM_SPLITS
    m = tl.load(stats_ptr + slot * 2, mask=ok, other=float("-inf"))
    l_s = tl.load(stats_ptr + slot * 2 + 1, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    acc = tl.load(part_ptr + slot[:, None] * DIM_PAD + dims[None, :], mask=ok[:, None],
                  other=0.0)
    total = tl.sum(l_s * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def _mla_decode_kernel(q_ptr, cache_ptr, tables_ptr, lens_ptr, out_ptr,
                       stride_qb, stride_qh, stride_cb, stride_ct, stride_tb, stride_ob,
                       stride_oh, scale_log2, num_heads,
                       RANK: tl.constexpr, RANK_PAD: tl.constexpr, ROPE: tl.constexpr,
                       ROPE_PAD: tl.constexpr, HEADS_PER_PROG: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
    seq = tl.program_id(0)
    heads = tl.program_id(1) * HEADS_PER_PROG + tl.arange(0, HEADS_PER_PROG)
    lat = tl.arange(0, RANK_PAD)
    rope = tl.arange(0, ROPE_PAD)
    toks = tl.arange(0, TILE)
    head_ok = heads < num_heads
    q_rows = q_ptr + seq * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_rows + lat[None, :], mask=head_ok[:, None] & (lat < RANK)[None, :],
                    other=0.0)
    q_rope = tl.load(q_rows + RANK + rope[None, :],
                     mask=head_ok[:, None] & (rope < ROPE)[None, :], other=0.0)
    ctx_len = tl.load(lens_ptr + seq).to(tl.int32)
    m_i = tl.full([HEADS_PER_PROG], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS_PER_PROG], tl.float32)
    acc = tl.zeros([HEADS_PER_PROG, RANK_PAD], tl.float32)
    for start in range(0, ctx_len, TILE):
        block = tl.load(tables_ptr + seq * stride_tb + start // BLOCK_SIZE).to(tl.int64)
        tok_ok = start + toks < ctx_len
        token_rows = cache_ptr + block * stride_cb + ((start % BLOCK_SIZE) + toks)[:, None] * stride_ct
        c = tl.load(token_rows + lat[None, :], mask=tok_ok[:, None] & (lat < RANK)[None, :],
                    other=0.0)
        k_rope = tl.load(token_rows + RANK + rope[None, :],
                         mask=tok_ok[:, None] & (rope < ROPE)[None, :], other=0.0)
        s = tl.dot(q_lat, tl.trans(c), input_precision="ieee")
        s = tl.dot(q_rope, tl.trans(k_rope), acc=s, input_precision="ieee") * scale_log2
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + lat[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & (lat < RANK)[None, :])


@functools.cache
def _jit(fn: Callable[..., None], interpret: bool) -> Any:
    """`triton.jit(fn)`, once per interpreter mode (the mode is fixed at jit time)."""
    del interpret  # part of the cache key only
    return _triton.jit(fn)


def _check_inputs(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, tile_tokens: int, *,
                  spans_blocks: bool = False) -> None:
    """Caller mistakes -> ValueError naming the field; a missing backend -> RuntimeError."""
    if not triton_decode_available(cache.device):
        raise RuntimeError(f"triton decode called on {cache.device} without triton "
                           "(and CUDA, or TRITON_INTERPRET=1 for CPU tensors)")
    if q.dim() != 3 or cache.dim() != 3:
        raise ValueError(f"q must be [B, H, D] and cache [num_blocks, block_size, kv_width], "
                         f"got q {tuple(q.shape)} and cache {tuple(cache.shape)}")
    batch = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_blocks], "
                         f"got {tuple(block_tables.shape)}")
    if tuple(context_lens.shape) != (batch,):
        raise ValueError(f"context_lens must be [{batch}], got {tuple(context_lens.shape)}")
    if q.dtype != cache.dtype or cache.dtype not in TRITON_DECODE_DTYPES:
        raise ValueError(f"q dtype {q.dtype} and cache dtype {cache.dtype} must be equal and "
                         f"one of {TRITON_DECODE_DTYPES}")
    if any(t.device != cache.device for t in (q, block_tables, context_lens)):
        raise ValueError(f"q, block_tables and context_lens must be on the cache's device "
                         f"{cache.device}")
    if cache.stride(-1) != 1:
        raise ValueError(f"cache must be contiguous in its last dimension, strides "
                         f"{cache.stride()}")
    block_size = cache.shape[1]
    for name, value in (("block_size", block_size), ("tile_tokens", tile_tokens)):
        if value < _MIN_DOT or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= {_MIN_DOT}, got {value}")
    if block_size % tile_tokens and not spans_blocks:
        raise ValueError(f"tile_tokens {tile_tokens} must divide block_size {block_size}")


MAX_SPLITS = 64
# 64 tokens per loop step whatever the block size (16-token tiles at block_size 16 made the
# loop latency-bound: 66 us/layer for 128 x 576 tokens on an H200, half the bandwidth)
GQA_TILE_TOKENS = 64
_graph_kernels = False


def _split_len(max_context: int, tile: int, splits: int) -> int:
    """Tokens per split when `splits` share the table's `max_context` tokens: whole tiles."""
    tiles = max(1, -(-max_context // tile))
    return -(-tiles // splits) * tile


def gqa_num_splits(batch: int, num_kv_heads: int, max_context: int, tile: int,
                   num_sms: int) -> tuple[int, int]:
    """(splits, tokens per split) for the split-context GQA decode: enough programs to fill
    the GPU (~4 per SM; a batch that fills it alone is not split), at most MAX_SPLITS splits,
    every split a whole number of tiles. Depends only on host-known bounds (graph-safe)."""
    tiles = max(1, -(-max_context // tile))
    wanted = -(-4 * num_sms // max(batch * num_kv_heads, 1))
    split_len = _split_len(max_context, tile, max(1, min(tiles, wanted, MAX_SPLITS)))
    return -(-max_context // split_len) if max_context > 0 else 1, split_len


@contextlib.contextmanager
def graph_kernels() -> Iterator[None]:
    """Inside, kernels are chosen for a step that CUDA graphs replay (decode_graphs runs its
    captures and their eager twins in it): a Triton launch then costs nothing per step, so
    the split-context attention and the fused elementwise kernels (triton_fused) are used at
    any size. Outside (eager steps), each Triton launch costs tens of microseconds of host
    time: attention is not split and small steps keep PyTorch's elementwise ops.
    Not thread-safe (an engine is driven by one thread)."""
    global _graph_kernels
    previous, _graph_kernels = _graph_kernels, True
    try:
        yield
    finally:
        _graph_kernels = previous


def graph_kernels_active() -> bool:
    return _graph_kernels


@functools.cache
def _num_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def paged_gqa_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, num_kv_heads: int, scale: float, *,
                     tile_tokens: int | None = None, num_splits: int | None = None
                     ) -> torch.Tensor:
    """Decode GQA over a Llama cache (per token K (kv_heads x dim) then V) in place.

    q [B, H, D] (the new token's queries; H a multiple of `num_kv_heads`), cache
    [num_blocks, block_size, 2 * num_kv_heads * D], block_tables [B, max_blocks] (int32/64;
    entries past a sequence's blocks are never read), context_lens [B] (tokens to attend,
    the new one included; each <= max_blocks * block_size, unchecked as it lives on the GPU).
    Returns softmax(scale * q K^T) V as [B, H, D] in q's dtype; a zero context gives zeros.
    `tile_tokens` (default 64, a power of two >= 16) may span several blocks. The context is cut
    into `num_splits` ranges attended in parallel and combined (flash-decoding); None picks
    them from the batch, the table width and the GPU's SM count (`gqa_num_splits`).
    """
    tile = tile_tokens or GQA_TILE_TOKENS
    q = q if q.stride(-1) == 1 else q.contiguous()
    _check_inputs(q, cache, block_tables, context_lens, tile, spans_blocks=True)
    batch, num_heads, head_dim = q.shape
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
    if cache.shape[2] != 2 * num_kv_heads * head_dim:
        raise ValueError(f"cache kv_width {cache.shape[2]} != 2 * num_kv_heads "
                         f"{num_kv_heads} * head_dim {head_dim}")
    max_context = block_tables.shape[1] * cache.shape[1]
    if num_splits is None and not graph_kernels_active():
        num_splits = 1  # an eager step pays each launch on the host: no combine kernel
    if num_splits is None:
        sms = _num_sms(cache.device.index or 0) if cache.is_cuda else 4
        num_splits, split_len = gqa_num_splits(batch, num_kv_heads, max_context, tile, sms)
    else:
        if num_splits <= 0:
            raise ValueError(f"num_splits must be > 0, got {num_splits}")
        split_len = _split_len(max_context, tile, num_splits)
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    dim_pad = _pad(head_dim)
    part = stats = out  # unused when there is one split
    if num_splits > 1:
        part = q.new_empty(batch, num_heads, num_splits, dim_pad, dtype=torch.float32)
        stats = q.new_empty(batch, num_heads, num_splits, 2, dtype=torch.float32)
    interpret = triton_interpreting()
    _jit(_gqa_decode_kernel, interpret)[(batch, num_kv_heads, num_splits)](
        q, cache, block_tables, context_lens, out, part, stats,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), scale * _LOG2E, num_kv_heads * head_dim, split_len,
        GROUP=group, GROUP_PAD=_pad(group), HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        BLOCK_SIZE=cache.shape[1], TILE=tile, NUM_SPLITS=num_splits)
    if num_splits > 1:
        _jit(_combine_splits_kernel, interpret)[(batch, num_heads)](
            part, stats, out, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
            DIM_PAD=dim_pad, NUM_SPLITS=num_splits, SPLITS_PAD=max(2, _pad(num_splits)))
    return out


def paged_mla_decode(q_full: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, kv_lora_rank: int, scale: float, *,
                     tile_tokens: int | None = None) -> torch.Tensor:
    """Absorbed MLA decode over the latent cache in place, as `flash_mla_decode`.

    q_full [B, H, kv_lora_rank + rope] (q_nope folded with W_UK, then q_rope), cache
    [num_blocks, block_size, kv_lora_rank + rope] (latent then rope key), block_tables and
    context_lens as for `paged_gqa_decode`. Returns softmax(scale * (q_lat c^T + q_rope
    k_rope^T)) c as [B, H, kv_lora_rank] in q's dtype (latent space; the caller applies W_UV).
    `tile_tokens` (default min(block_size, 32)) must divide block_size.
    """
    tile = tile_tokens or min(cache.shape[1], 32)
    q_full = q_full if q_full.stride(-1) == 1 else q_full.contiguous()
    _check_inputs(q_full, cache, block_tables, context_lens, tile)
    batch, num_heads, width = q_full.shape
    if cache.shape[2] != width:
        raise ValueError(f"cache kv_width {cache.shape[2]} != q_full width {width}")
    if not 0 < kv_lora_rank < width:
        raise ValueError(f"kv_lora_rank {kv_lora_rank} must be in (0, {width})")
    rope_dim = width - kv_lora_rank
    out = q_full.new_empty(batch, num_heads, kv_lora_rank)
    heads_per_prog = _MIN_DOT  # an fp32 [16, rank] accumulator per program
    grid = (batch, -(-num_heads // heads_per_prog))
    _jit(_mla_decode_kernel, triton_interpreting())[grid](
        q_full, cache, block_tables, context_lens, out,
        q_full.stride(0), q_full.stride(1), cache.stride(0), cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1), scale * _LOG2E, num_heads,
        RANK=kv_lora_rank, RANK_PAD=_pad(kv_lora_rank), ROPE=rope_dim,
        ROPE_PAD=_pad(rope_dim), HEADS_PER_PROG=heads_per_prog,
        BLOCK_SIZE=cache.shape[1], TILE=tile)
    return out
