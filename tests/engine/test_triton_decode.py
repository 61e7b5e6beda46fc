"""Triton paged decode kernels against an explicit float64 reference over the same cache.

On CUDA the kernels run compiled; without CUDA they run under Triton's CPU interpreter
(`TRITON_INTERPRET=1`, set per test), so shapes stay tiny. Cache slots that no sequence owns
(and the unused tail of each last block) hold NaN, so any read past a context or through a
wrong block-table entry shows up as NaN in the output. Tolerances: fp32 atol=rtol=1e-5;
fp16 atol 2e-3 and bf16 atol 1.6e-2 (the probabilities are cast to the cache dtype before the
P.V product, as flash attention does).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from backends.engine import triton_decode
from backends.engine.attention import build_plan, gqa_attention
from backends.engine.model_api import AttentionMetadata
from backends.engine.models.mla import latent_attention

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (the gpu extra)")

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    # The interpreter must be on when triton is first imported; the variable itself is set
    # per test (fixture `device`) so that it does not leak into other tests.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        INTERPRETER_OK = triton_decode.triton_interpreting()
else:
    INTERPRETER_OK = False

TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """CUDA when present, else CPU under the Triton interpreter (for this test only)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not INTERPRETER_OK:
        pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET=1 could be set "
                    "(run this file alone or with TRITON_INTERPRET=1)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


@dataclass(frozen=True, slots=True)
class PagedCase:
    """A scattered pool: `cache` [num_blocks, block_size, width] with NaN in unowned slots."""

    cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, rows padded with 0
    context_lens: torch.Tensor  # [B] int64


def make_case(context_lens: list[int], block_size: int, width: int, dtype: torch.dtype,
              device: torch.device, seed: int) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN
    cache = torch.full((num_blocks, block_size, width), float("nan"), dtype=torch.float64)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(context_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    for seq, ctx_len in enumerate(context_lens):
        for i in range(blocks_per_seq[seq]):
            block_id = order.pop()
            tables[seq, i] = block_id
            filled = min(block_size, ctx_len - i * block_size)
            cache[block_id, :filled] = torch.randn(filled, width, generator=gen,
                                                   dtype=torch.float64)
    return PagedCase(cache.to(device=device, dtype=dtype), tables.to(device),
                     torch.tensor(context_lens, dtype=torch.int64, device=device))


def context_rows(case: PagedCase, seq: int) -> torch.Tensor:
    """The sequence's cache rows [ctx_len, width] in float64, in token order."""
    block_size = case.cache.shape[1]
    ctx_len = int(case.context_lens[seq])
    num_blocks = -(-ctx_len // block_size)
    blocks = case.cache[case.block_tables[seq, :num_blocks].long()]
    return blocks.reshape(-1, case.cache.shape[2])[:ctx_len].double().cpu()


def reference_gqa(q: torch.Tensor, case: PagedCase, num_kv_heads: int,
                  scale: float) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    out = torch.empty(batch, num_heads, head_dim, dtype=torch.float64)
    for seq in range(batch):
        rows = context_rows(case, seq)
        k = rows[:, : num_kv_heads * head_dim].view(-1, num_kv_heads, head_dim)
        v = rows[:, num_kv_heads * head_dim:].view(-1, num_kv_heads, head_dim)
        for head in range(num_heads):
            kv_head = head // group
            probs = torch.softmax(k[:, kv_head] @ q[seq, head].double().cpu() * scale, dim=0)
            out[seq, head] = probs @ v[:, kv_head]
    return out


def reference_mla(q_full: torch.Tensor, case: PagedCase, rank: int,
                  scale: float) -> torch.Tensor:
    out = torch.empty(*q_full.shape[:2], rank, dtype=torch.float64)
    for seq in range(q_full.shape[0]):
        rows = context_rows(case, seq)
        scores = q_full[seq].double().cpu() @ rows.T * scale  # [H, ctx]
        out[seq] = torch.softmax(scores, dim=-1) @ rows[:, :rank]
    return out


def skip_interpreted_bf16(device: torch.device, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton 3.9's interpreter computes tl.dot on bf16 operands from their raw "
                    "bits (garbage); bf16 is checked on CUDA only")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "block_size", "context_lens"), [
    (2, 2, 16, [1, 16, 17, 40]),       # group 1; a lone token, an exact block, crossings
    (4, 2, 16, [33, 5, 48]),           # group 2
    (8, 2, 64, [64, 65, 7, 130]),      # group 4, big blocks
])
def test_gqa_matches_reference(device: torch.device, num_heads: int, num_kv_heads: int,
                               block_size: int, context_lens: list[int]) -> None:
    head_dim = 16
    case = make_case(context_lens, block_size, 2 * num_kv_heads * head_dim, torch.float32,
                     device, seed=num_heads)
    q = torch.randn(len(context_lens), num_heads, head_dim,
                    generator=torch.Generator().manual_seed(1)).to(device)
    out = triton_decode.paged_gqa_decode(q, case.cache, case.block_tables, case.context_lens,
                                         num_kv_heads, head_dim**-0.5)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert_close(out, reference_gqa(q, case, num_kv_heads, head_dim**-0.5), torch.float32)


@pytest.mark.parametrize(("num_splits", "tile"), [(1, 16), (2, 16), (3, 16), (7, 16), (1, 64),
                                                  (3, 32)])
def test_gqa_split_context_matches_reference(device: torch.device, num_splits: int,
                                             tile: int) -> None:
    """Flash-decoding splits (some empty for the short sequences, one split ending mid-block)
    combine to the same attention; tiles longer than a block gather several blocks; a
    zero-length context still gives zeros."""
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 16, 16
    context_lens = [1, 16, 17, 100, 0]
    case = make_case([max(n, 1) for n in context_lens], block_size,
                     2 * num_kv_heads * head_dim, torch.float32, device, seed=11)
    lens = torch.tensor(context_lens, dtype=torch.int64, device=device)
    case = PagedCase(case.cache, case.block_tables, lens)
    q = torch.randn(len(context_lens), num_heads, head_dim,
                    generator=torch.Generator().manual_seed(12)).to(device)
    out = triton_decode.paged_gqa_decode(q, case.cache, case.block_tables, lens, num_kv_heads,
                                         head_dim**-0.5, tile_tokens=tile, num_splits=num_splits)
    expected = reference_gqa(q[:4], PagedCase(case.cache, case.block_tables[:4], lens[:4]),
                             num_kv_heads, head_dim**-0.5)
    assert_close(out[:4], expected, torch.float32)
    assert torch.equal(out[4].cpu(), torch.zeros(num_heads, head_dim))


def test_gqa_num_splits() -> None:
    split = triton_decode.gqa_num_splits
    assert split(1, 8, 640, 64, 132) == (10, 64)  # one sequence: one tile per program
    assert split(32, 8, 640, 64, 132) == (3, 256)  # 768 programs
    assert split(128, 8, 640, 64, 132) == (1, 640)  # 1024 programs fill the GPU alone
    assert split(128, 8, 64, 64, 132) == (1, 64)
    assert split(1, 8, 1 << 20, 64, 132) == (64, 16384)  # capped at MAX_SPLITS
    assert split(2, 2, 0, 16, 4) == (1, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gqa_half_dtypes(device: torch.device, dtype: torch.dtype) -> None:
    skip_interpreted_bf16(device, dtype)
    num_heads, num_kv_heads, head_dim = 4, 2, 24  # head_dim padded to 32 inside
    case = make_case([20, 3], 16, 2 * num_kv_heads * head_dim, dtype, device, seed=7)
    q = torch.randn(2, num_heads, head_dim, generator=torch.Generator().manual_seed(2))
    q = q.to(device=device, dtype=dtype)
    out = triton_decode.paged_gqa_decode(q, case.cache, case.block_tables, case.context_lens,
                                         num_kv_heads, 0.2)
    assert out.dtype == dtype
    assert_close(out, reference_gqa(q, case, num_kv_heads, 0.2), dtype)


def test_gqa_equals_engine_decode_path(device: torch.device) -> None:
    """Same semantics as attention.gqa_attention's decode-only path (grouping, scale)."""
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 16, 16
    case = make_case([18, 31, 1], block_size, 2 * num_kv_heads * head_dim, torch.float32,
                     device, seed=3)
    cache = torch.nan_to_num(case.cache, nan=0.0)
    q = torch.randn(3, num_heads, head_dim,
                    generator=torch.Generator().manual_seed(4)).to(device)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(3, dtype=torch.int64, device=device),
        query_start_loc=[0, 1, 2, 3], context_lens=case.context_lens,
        block_tables=case.block_tables, max_context_len=31, decode_only=True)
    plan = build_plan(meta, block_size, torch.float32)
    expected = gqa_attention(q, cache, plan, num_kv_heads, 0.25, cache.new_empty(0))
    out = triton_decode.paged_gqa_decode(q, cache, case.block_tables, case.context_lens,
                                         num_kv_heads, 0.25)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("block_size", "tile_tokens", "dtype"), [
    (64, 32, torch.float32),  # two tiles per block
    (16, 16, torch.float32),
    (64, 64, torch.float16),
    (64, 64, torch.bfloat16),
])
def test_mla_matches_reference(device: torch.device, block_size: int, tile_tokens: int,
                               dtype: torch.dtype) -> None:
    skip_interpreted_bf16(device, dtype)
    rank, rope, num_heads = 64, 16, 20  # tiny-mla's dims; 20 heads span two head tiles
    case = make_case([1, 64, 65, 100], block_size, rank + rope, dtype, device, seed=5)
    q_full = torch.randn(4, num_heads, rank + rope, generator=torch.Generator().manual_seed(6))
    q_full = q_full.to(device=device, dtype=dtype)
    out = triton_decode.paged_mla_decode(q_full, case.cache, case.block_tables,
                                         case.context_lens, rank, 0.1, tile_tokens=tile_tokens)
    assert out.shape == (4, num_heads, rank) and out.dtype == dtype
    assert_close(out, reference_mla(q_full, case, rank, 0.1), dtype)


def test_mla_equals_engine_latent_attention(device: torch.device) -> None:
    """Same semantics as the engine's torch absorbed decode (models/mla.latent_attention)."""
    rank, rope, block_size = 64, 16, 64
    case = make_case([70, 2], block_size, rank + rope, torch.float32, device, seed=9)
    cache = torch.nan_to_num(case.cache, nan=0.0)
    q_full = torch.randn(2, 4, rank + rope,
                         generator=torch.Generator().manual_seed(10)).to(device)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(2, dtype=torch.int64, device=device),
        query_start_loc=[0, 1, 2], context_lens=case.context_lens,
        block_tables=case.block_tables, max_context_len=70, decode_only=True)
    plan = build_plan(meta, block_size, torch.float32)
    assert plan.block_ids is not None and plan.bias is not None
    entries = cache[plan.block_ids].flatten(1, 2)  # [B, L, R + rope]
    expected = latent_attention(q_full, entries, plan.bias[:, 0], rank, 0.125)
    out = triton_decode.paged_mla_decode(q_full, cache, plan.block_ids, case.context_lens,
                                         rank, 0.125)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_field(device: torch.device) -> None:
    case = make_case([5], 16, 64, torch.float32, device, seed=8)
    q = torch.zeros(1, 4, 16, device=device)
    args = (case.cache, case.block_tables, case.context_lens)
    with pytest.raises(ValueError, match=r"^num_kv_heads 3 must divide num_heads 4$"):
        triton_decode.paged_gqa_decode(q, *args, 3, 1.0)
    with pytest.raises(ValueError, match=r"^cache kv_width 64 != 2 \* num_kv_heads 1 \* "
                                         r"head_dim 16$"):
        triton_decode.paged_gqa_decode(q, *args, 1, 1.0)
    with pytest.raises(ValueError, match=r"^tile_tokens must be a power of two >= 16, got 8$"):
        triton_decode.paged_gqa_decode(q, *args, 2, 1.0, tile_tokens=8)
    with pytest.raises(ValueError, match=r"^q dtype torch.float16 and cache dtype "):
        triton_decode.paged_gqa_decode(q.half(), *args, 2, 1.0)
    with pytest.raises(ValueError, match=r"^kv_lora_rank 64 must be in \(0, 64\)$"):
        triton_decode.paged_mla_decode(torch.zeros(1, 4, 64, device=device), *args, 64, 1.0)


# Compiles both kernels to sm_90 cubins with the pinned arguments the wrappers pass, in a fresh
# process (this one imported triton under the interpreter). No GPU is needed to compile.
COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from backends.engine import triton_decode as td
assert td._load_triton()
ptrs = dict(q_ptr="*bf16", cache_ptr="*bf16", tables_ptr="*i32", lens_ptr="*i64",
            out_ptr="*bf16", stride_qb="i32", stride_qh="i32", stride_cb="i32",
            stride_ct="i32", stride_tb="i32", stride_ob="i32", stride_oh="i32",
            scale_log2="fp32")
gqa = dict(part_ptr="*fp32", stats_ptr="*fp32", kv_dim="i32", split_len="i32")
cases = [
    (td._gqa_decode_kernel, gqa, dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128,
     DIM_PAD=128, BLOCK_SIZE=16, TILE=64, NUM_SPLITS=1)),
    (td._gqa_decode_kernel, gqa, dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128,
     DIM_PAD=128, BLOCK_SIZE=16, TILE=64, NUM_SPLITS=8)),
    (td._mla_decode_kernel, dict(num_heads="i32"), dict(RANK=512, RANK_PAD=512, ROPE=64,
     ROPE_PAD=64, HEADS_PER_PROG=16, BLOCK_SIZE=64, TILE=32)),
]
for fn, scalars, consts in cases:
    signature = dict(ptrs, **scalars, **{name: "constexpr" for name in consts})
    kernel = triton.compile(ASTSource(triton.jit(fn), signature, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32))
    print(fn.__name__, "mma" in kernel.asm["ptx"], len(kernel.asm["cubin"]) > 0)
combine = dict(part_ptr="*fp32", stats_ptr="*fp32", out_ptr="*bf16", stride_ob="i32",
               stride_oh="i32", HEAD_DIM="constexpr", DIM_PAD="constexpr",
               NUM_SPLITS="constexpr", SPLITS_PAD="constexpr")
consts = dict(HEAD_DIM=128, DIM_PAD=128, NUM_SPLITS=8, SPLITS_PAD=16)
kernel = triton.compile(ASTSource(triton.jit(td._combine_splits_kernel), combine,
                                  constexprs=consts), target=GPUTarget("cuda", 90, 32))
print("_combine_splits_kernel", len(kernel.asm["cubin"]) > 0)
from backends.engine import triton_fused as tf
assert tf._bind()
fused = [
    (tf._rope_neox_kernel, dict(x_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16",
     stride_xt="i32", stride_xh="i32", stride_ct="i32", num_heads="i32"),
     dict(HEAD_DIM=64, HEADS_PAD=64)),
    (tf._silu_mul_kernel, dict(gate_up_ptr="*bf16", out_ptr="*bf16", stride_in="i32",
     stride_out="i32", width="i32"), dict(BLOCK=1024)),
]
for fn, scalars, consts in fused:
    signature = dict(scalars, **{name: "constexpr" for name in consts})
    kernel = triton.compile(ASTSource(triton.jit(fn), signature, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32))
    print(fn.__name__, len(kernel.asm["cubin"]) > 0)
"""


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    """The compiled (GPU) path: bf16 kernels at Llama-8B / DeepSeek head sizes lower through
    Triton's NVIDIA backend to PTX with tensor-core MMAs and a cubin (checks what the CPU
    interpreter cannot: typing of loop-carried values, dot shapes, shared-memory fit)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, check=False, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["_gqa_decode_kernel True True",
                                        "_gqa_decode_kernel True True",
                                        "_mla_decode_kernel True True",
                                        "_combine_splits_kernel True",
                                        "_rope_neox_kernel True",
                                        "_silu_mul_kernel True"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_rope_equals_torch_rope(device: torch.device, dtype: torch.dtype) -> None:
    """One-kernel neox rotary on a strided q/k view of a fused projection equals
    apply_rope_neox_ (to rounding), and leaves the V columns alone."""
    from backends.engine.models.rope import apply_rope_neox_, neox_tables
    from backends.engine.triton_fused import rope_neox_

    gen = torch.Generator().manual_seed(21)
    tokens, heads, kv_heads, dim = 5, 3, 1, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(device, dtype)
    angles = torch.rand(tokens, dim // 2, generator=gen) * 6
    cos, sin = neox_tables(angles.cos().to(device, dtype), angles.sin().to(device, dtype))
    expected = qkv.clone()
    view = (heads + kv_heads) * dim
    apply_rope_neox_(expected[:, :view].view(tokens, heads + kv_heads, dim), cos, sin)
    rope_neox_(qkv[:, :view].view(tokens, heads + kv_heads, dim), cos, sin)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(qkv, expected, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, view:], expected[:, view:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_silu_mul_equals_torch(device: torch.device, dtype: torch.dtype) -> None:
    import torch.nn.functional as F

    from backends.engine.triton_fused import silu_mul

    width = 1500  # two column blocks, the second partial
    gate_up = torch.randn(3, 2 * width, generator=torch.Generator().manual_seed(22))
    gate_up = gate_up.to(device, dtype)
    expected = F.silu(gate_up[:, :width].float()) * gate_up[:, width:].float()
    out = silu_mul(gate_up)
    assert out.shape == (3, width) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match=r"silu_mul: gate_up must be \[T, 2 \* width\]"):
        silu_mul(gate_up[:, :3])


def test_graph_kernels_context_nests_and_restores() -> None:
    assert not triton_decode.graph_kernels_active()
    with triton_decode.graph_kernels():
        assert triton_decode.graph_kernels_active()
        with triton_decode.graph_kernels():
            assert triton_decode.graph_kernels_active()
        assert triton_decode.graph_kernels_active()
    assert not triton_decode.graph_kernels_active()
    with pytest.raises(RuntimeError), triton_decode.graph_kernels():
        raise RuntimeError("inside")
    assert not triton_decode.graph_kernels_active()
