"""Pure-torch paged attention (CPU and CUDA) over `[num_blocks, block_size, kv_width]` caches.

`build_plan` turns one step's `AttentionMetadata` into gather indices and masks once per
forward; every layer reuses it. Prefill / mixed steps attend per sequence (causal over its
cached blocks + new tokens); decode-only steps are vectorized over the batch: the padded
block tables become one `[B, L]` slot gather and a `[B, L]` validity mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.engine.decode_workspace import WorkspaceStep, update
from backends.engine.model_api import AttentionMetadata
from backends.engine.triton_decode import paged_gqa_decode, triton_decode_usable


@dataclass(frozen=True, slots=True)
class SeqSpan:
    """One sequence of a prefill/mixed step: its queries, its context slots and its mask.

    mask: None when every query sees every key (a single query), `causal` True when the
    queries are the whole context (plain causal), else a bool `[q_len, ctx_len]` (True = attend).
    """

    query_start: int
    query_end: int
    slots: torch.Tensor
    mask: torch.Tensor | None
    causal: bool


@dataclass(frozen=True, slots=True)
class PagedPlan:
    """Per-forward gather plan. Decode: `block_ids` [B, n] (the first n blocks of each table)
    and `valid` [B, n * block_size] (True = a real token of that sequence); `context_lens` [B];
    `bias` [B, 1, 1, n * block_size]: 0 for real tokens, -inf for padding (the cache dtype).
    Prefill: `uniform_len` > 0 when every sequence is a fresh (no cached prefix) prompt of
    that many tokens, so one batched causal attention serves them all.
    `workspace`: set when some sequences run over the decode workspace: all of them on a
    decode step (then the paged fields are None: nothing is gathered), or, in a mixed step,
    those in `workspace.seq_indices` (they get no span)."""

    decode_only: bool
    spans: tuple[SeqSpan, ...]
    block_ids: torch.Tensor | None
    valid: torch.Tensor | None
    context_lens: torch.Tensor | None
    bias: torch.Tensor | None
    uniform_len: int = 0
    workspace: WorkspaceStep | None = None


def build_plan(meta: AttentionMetadata, block_size: int, dtype: torch.dtype) -> PagedPlan:
    """Precompute what every layer needs to read the cache for this step."""
    device = meta.slot_mapping.device
    tables = meta.block_tables.to(device=device, dtype=torch.int64)
    workspace = meta.workspace
    if workspace is not None and workspace.token_index is None:
        return PagedPlan(True, (), None, None, None, None, workspace=workspace)
    offsets = torch.arange(block_size, device=device, dtype=torch.int64)
    if meta.decode_only:
        num_blocks = -(-meta.max_context_len // block_size)
        positions = torch.arange(num_blocks * block_size, device=device)
        context_lens = meta.context_lens.to(device)
        valid = positions[None, :] < context_lens[:, None]
        bias = torch.zeros(valid.shape, dtype=dtype, device=device)
        bias = bias.masked_fill_(~valid, float("-inf"))[:, None, None, :]
        return PagedPlan(True, (), tables[:, :num_blocks].contiguous(), valid, context_lens, bias)
    spans = []
    covered = set(workspace.seq_indices) if workspace is not None else set()
    host_lens = meta.context_lens_list
    if host_lens is None:
        host_lens = meta.context_lens.tolist()  # a device sync on GPUs
    for i, ctx in enumerate(host_lens):
        if i in covered:
            continue  # its one query attends over the workspace
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        num_blocks = -(-ctx // block_size)
        slots = (tables[i, :num_blocks, None] * block_size + offsets).flatten()[:ctx]
        q_len = end - start
        mask = None
        if 1 < q_len < ctx:
            key_pos = torch.arange(ctx, device=device)
            query_pos = torch.arange(ctx - q_len, ctx, device=device)
            mask = key_pos[None, :] <= query_pos[:, None]
        spans.append(SeqSpan(start, end, slots, mask, causal=q_len == ctx and q_len > 1))
    lengths = {span.query_end - span.query_start for span in spans}
    uniform = len(lengths) == 1 and all(span.causal for span in spans) and not covered
    return PagedPlan(False, tuple(spans), None, None, None, None,
                     uniform_len=lengths.pop() if uniform else 0, workspace=workspace)


def write_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """Store `values` [T, kv_width] at `slot_mapping` of `cache` [num_blocks, block_size, kv_width]."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, values.to(cache.dtype))


def gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of the flattened cache at `slots` [n] -> `[n, kv_width]`."""
    return cache.view(-1, cache.shape[-1]).index_select(0, slots)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Whole blocks `block_ids` [B, n] -> `[B, n * block_size, kv_width]` (a copy)."""
    batch, num_blocks = block_ids.shape
    blocks = cache.index_select(0, block_ids.reshape(-1))
    return blocks.view(batch, num_blocks * cache.shape[1], cache.shape[2])


def sdpa_span(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: SeqSpan,
              scale: float) -> torch.Tensor:
    """Attention of one sequence. q [q_len, H, Dk], k [ctx, Hk, Dk], v [ctx, Hk, Dv] with
    H a multiple of Hk (grouped-query). Returns [q_len, H, Dv]. Runs as a batch of one:
    PyTorch's fused CPU kernels take 4-D inputs (3-D ones were ~4x slower causal, ~2x masked)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=span.mask, is_causal=span.causal, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out[0].transpose(0, 1)


def span_entries(cache: torch.Tensor, span: SeqSpan, fresh: torch.Tensor) -> torch.Tensor:
    """The cache rows [ctx, kv_width] a span attends to; a fresh prompt (no cached prefix)
    reads this step's just-written rows (`fresh`, as stored) instead of gathering them."""
    if span.causal:
        return fresh[span.query_start:span.query_end]
    return gather(cache, span.slots)


def gqa_attention(q: torch.Tensor, cache: torch.Tensor, plan: PagedPlan, num_kv_heads: int,
                  scale: float, fresh: torch.Tensor) -> torch.Tensor:
    """Paged GQA over a cache whose tokens hold K (heads x dim) then V. q [T, H, D] -> [T, H, D].
    `fresh` [T, kv_width] is this step's KV exactly as written into the cache."""
    head_dim = q.shape[-1]
    kv_dim = num_kv_heads * head_dim
    if plan.uniform_len:
        return _uniform_prefill(q, fresh, plan.uniform_len, num_kv_heads, scale)
    if plan.decode_only:
        if plan.block_ids is None or plan.bias is None:
            raise RuntimeError("decode plan without block ids")
        if cache.is_cuda and plan.context_lens is not None and triton_decode_usable(q, cache):
            return paged_gqa_decode(q, cache, plan.block_ids, plan.context_lens,
                                    num_kv_heads, scale)
        kv = gather_blocks(cache, plan.block_ids)
        batch, length = kv.shape[:2]
        k = kv[..., :kv_dim].view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
        v = kv[..., kv_dim:].view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
        # A decode query attends to every real token, so the query heads sharing a KV head
        # can ride as that head's "query rows": one plain SDPA without GQA expansion.
        grouped = q.view(batch, num_kv_heads, q.shape[1] // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=plan.bias, scale=scale)
        return out.reshape(q.shape)
    out = torch.empty_like(q)
    for span in plan.spans:
        kv = span_entries(cache, span, fresh)
        k = kv[:, :kv_dim].view(-1, num_kv_heads, head_dim)
        v = kv[:, kv_dim:].view(-1, num_kv_heads, head_dim)
        out[span.query_start:span.query_end] = sdpa_span(
            q[span.query_start:span.query_end], k, v, span, scale)
    return out


def gqa_workspace_decode(q: torch.Tensor, fresh: torch.Tensor, cache: torch.Tensor,
                         step: WorkspaceStep, layer: int, num_kv_heads: int,
                         scale: float) -> torch.Tensor:
    """Decode GQA over the workspace (K and V buffers `[rows, kv_heads, len, dim]`): appends
    `fresh` [B, kv_width] (this step's KV as written to the paged cache) after any refill from
    `cache`, then one grouped SDPA over the rows. q [B, H, D] -> [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    kv_dim = num_kv_heads * head_dim

    def split(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (rows[:, :kv_dim].view(-1, num_kv_heads, head_dim),
                rows[:, kv_dim:].view(-1, num_kv_heads, head_dim))

    k, v = update(step, layer, cache, split(fresh), split)
    rows = q
    if not step.identity:
        rows = q.new_zeros(step.num_rows, num_heads, head_dim).index_copy_(0, step.slots, q)
    grouped = rows.view(step.num_rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=step.bias, scale=scale)
    out = out.reshape(step.num_rows, num_heads, head_dim)
    return out if step.identity else out.index_select(0, step.slots)


def _uniform_prefill(q: torch.Tensor, fresh: torch.Tensor, length: int, num_kv_heads: int,
                     scale: float) -> torch.Tensor:
    """Fresh equal-length prompts: one causal SDPA over [B, heads, length, dim]."""
    num_tokens, num_heads, head_dim = q.shape
    batch = num_tokens // length
    kv = fresh.view(batch, length, 2, num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        q.view(batch, length, num_heads, head_dim).transpose(1, 2),
        kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2),
        is_causal=True, scale=scale, enable_gqa=num_kv_heads != num_heads,
    )
    return out.transpose(1, 2).reshape(q.shape)
