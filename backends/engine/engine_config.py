"""Engine configuration: KV pool size, batching limits, device and dtype."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

DEFAULT_BLOCK_SIZE = 16
MLA_BLOCK_SIZE = 64  # FlashMLA reads 64-token pages
DECODE_GRAPH_MODES = ("auto", "capture", "static", "off")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How an `LLMEngine` sizes and batches.

    block_size: tokens per KV block; None picks 16, or 64 for MLA models.
    num_blocks: KV blocks in the pool; None sizes the pool from `kv_cache_memory_bytes`.
    max_num_seqs: most sequences in one step's batch.
    max_num_batched_tokens: per-step token budget (decode tokens plus prefill chunks).
    max_model_len: most tokens (prompt + output) per sequence; None takes the model's limit.
    seed: seeds the engine generator used by unseeded sampled requests.
    kv_import_timeout_s: deadline for reading one request's imported KV (then recompute).
    decode_workspace: on CPU, decode over contiguous per-sequence KV copies beside the paged
    cache (appended each step, refilled from the paged cache when stale; at most the pool's
    size again, at least 64 MiB) instead of gathering every sequence's blocks every step.
    decode_graphs: how decode-only steps run (see decode_graphs.py). "auto": captured CUDA
    graphs on CUDA, the plain eager path elsewhere; "capture": CUDA graphs (CUDA only);
    "static": the graphs' padded static-buffer forward run eagerly (any device; the exact
    twin of a replay); "off": the plain eager path.
    graph_max_batch: largest decode batch served by graphs (bigger batches run eagerly);
    None takes max_num_seqs.
    async_output: detokenize a step's tokens during the next step's device work (vLLM's async
    output processing): a request's output arrives one `step` call later, ending is decided on
    time (requests with stop strings are never deferred). None: on for CUDA, off elsewhere.
    detokenize: fill RequestOutput.text. Off, outputs carry token ids and an empty text (stop
    strings still end a request): for a worker whose caller makes the text itself.
    """

    block_size: int | None = None
    num_blocks: int | None = None
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    kv_import_timeout_s: float = 30.0
    decode_workspace: bool = True
    decode_graphs: str = "auto"
    graph_max_batch: int | None = None
    async_output: bool | None = None
    detokenize: bool = True

    def __post_init__(self) -> None:
        positive = {
            "kv_cache_memory_bytes": self.kv_cache_memory_bytes,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
        }
        for name in ("block_size", "num_blocks", "max_model_len", "graph_max_batch"):
            value = getattr(self, name)
            if value is not None:
                positive[name] = value
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.decode_graphs not in DECODE_GRAPH_MODES:
            raise ValueError(f"decode_graphs must be one of {DECODE_GRAPH_MODES}, "
                             f"got {self.decode_graphs!r}")
        if self.decode_graphs == "capture" and not self.device.startswith("cuda"):
            raise ValueError(f"decode_graphs 'capture' needs a CUDA device, "
                             f"got device {self.device!r}")

    def async_output_on(self) -> bool:
        """Whether this config defers detokenization (`async_output`, None: on CUDA)."""
        return self.async_output if self.async_output is not None else self.device.startswith("cuda")

    def graph_mode(self) -> str | None:
        """The DecodeGraphs mode for this config, or None for the plain eager path."""
        if self.decode_graphs == "auto":
            return "capture" if self.device.startswith("cuda") else None
        return None if self.decode_graphs == "off" else self.decode_graphs

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def resolve(self, *, is_mla: bool, model_max_len: int, kv_bytes_per_token: int) -> EngineConfig:
        """A copy with every None filled in for a given model.

        `kv_bytes_per_token` covers all layers. max_model_len defaults to the smaller of the
        model's limit and the pool's capacity; ValueError when an explicit one exceeds the pool.
        """
        block_size = self.block_size or (MLA_BLOCK_SIZE if is_mla else DEFAULT_BLOCK_SIZE)
        num_blocks = self.num_blocks or self.kv_cache_memory_bytes // (
            kv_bytes_per_token * block_size
        )
        if num_blocks <= 0:
            raise ValueError(
                f"kv_cache_memory_bytes={self.kv_cache_memory_bytes} holds no block of "
                f"{block_size} tokens ({kv_bytes_per_token} bytes per token)"
            )
        capacity = num_blocks * block_size
        max_model_len = self.max_model_len or min(model_max_len, capacity)
        if max_model_len > capacity:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the KV pool ({num_blocks} blocks of "
                f"{block_size} tokens)"
            )
        return dataclasses.replace(
            self, block_size=block_size, num_blocks=num_blocks, max_model_len=max_model_len
        )
