"""GGUF files -> a cached HF-style checkpoint directory that `loader` loads like any other.

`convert_gguf` reads a llama.cpp GGUF file with the `gguf` package: the config from
`llama.*` metadata, every tensor dequantized to float32 (QUANT_TYPES), q/k rows un-permuted
(llama.cpp interleaves each head's rotary halves; HF and this engine keep them split) and the
tokenizer from `tokenizer.*` metadata (gguf_tokenizer.py). It writes config.json,
model.safetensors (float32), tokenizer.json, tokenizer_config.json (with the chat template).

`converted_checkpoint` does that once per file: the result is cached under
`cache_root()/gguf/<stem>-<key>` (key: the file's path, size and mtime), written to a temporary
directory and renamed into place under a lock file, so concurrent starts (a server's workers)
convert once and never read a half-written directory. Clear the cache with
`rm -rf ~/.cache/triton-pd` (or `$TRITON_PD_CACHE`). Every bad input raises ValueError naming
the file and the metadata key, tensor or type at fault.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from backends.engine.config import LLAMA, parse_model_config
from backends.engine.gguf_tokenizer import build_gguf_tokenizer

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
CONVERTER_VERSION = 1
LOCK_TIMEOUT_S = 900.0
# GGML type names this loader dequantizes (all through gguf.quants.dequantize).
QUANT_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_LAYER_TENSORS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                  "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                  "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                  "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def cache_root() -> Path:
    """`$TRITON_PD_CACHE`, else `$XDG_CACHE_HOME/triton-pd`, else `~/.cache/triton-pd`."""
    if os.environ.get("TRITON_PD_CACHE"):
        return Path(os.environ["TRITON_PD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "triton-pd"


def converted_dir(path: Path) -> Path:
    """Where `converted_checkpoint(path)` keeps its result (exists or not)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{digest}"


def converted_checkpoint(source: str | Path) -> Path:
    """The cached checkpoint directory of GGUF file `source`, converting it on first use."""
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r}: no such file")
    _check_magic(path)
    target = converted_dir(path)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if not (target / "config.json").is_file():
            start = time.monotonic()
            tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                convert_gguf(path, tmp)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("converted %s to %s in %.1f s", path, target, time.monotonic() - start)
    return target


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    with open(lock_path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{lock_path}: held by another conversion for more than "
                                       f"{LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_magic(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"GGUF file {str(path)!r}: not a GGUF file (starts with {magic!r}, "
                         f"expected {GGUF_MAGIC!r})")


def open_gguf(path: Path) -> Any:
    """A gguf.GGUFReader over `path`; ValueError when the file is not a complete GGUF."""
    from gguf import GGUFReader

    _check_magic(path)
    try:
        return GGUFReader(str(path))
    except (ValueError, IndexError, OSError, TypeError) as exc:
        raise ValueError(f"GGUF file {str(path)!r}: cannot be read, truncated or corrupt "
                         f"({type(exc).__name__}: {exc})") from None


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata key -> its decoded value (str, int, float, bool or list)."""
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("GGUF.")}


def _meta(meta: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = meta.get(key, default)
    if value is None:
        raise ValueError(f"GGUF metadata {key}: missing")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"GGUF metadata {key}: expected an integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise ValueError(f"GGUF metadata {key}: expected a number, got {value!r}")
    return value


def hf_config(meta: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """An HF config.json dict for a Llama GGUF (parse_model_config validates the rest)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF metadata general.architecture: unsupported {arch!r} "
                         "(supported: 'llama')")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError(f"GGUF metadata llama.rope.scaling.type: unsupported {scaling!r} "
                         "(or a rope_freqs tensor); only plain RoPE is supported")
    hidden = _meta(meta, "llama.embedding_length", int)
    heads = _meta(meta, "llama.attention.head_count", int)
    head_dim = _meta(meta, "llama.attention.key_length", int, hidden // heads)
    rot_dim = _meta(meta, "llama.rope.dimension_count", int, head_dim)
    if rot_dim != head_dim:
        raise ValueError(f"GGUF metadata llama.rope.dimension_count: {rot_dim} != head dim "
                         f"{head_dim} (partial rotary is not supported)")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return {
        "architectures": [LLAMA], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": _meta(meta, "llama.vocab_size", int, len(tokens) or None),
        "hidden_size": hidden,
        "intermediate_size": _meta(meta, "llama.feed_forward_length", int),
        "num_hidden_layers": _meta(meta, "llama.block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta(meta, "llama.attention.head_count_kv", int, heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(_meta(meta, "llama.attention.layer_norm_rms_epsilon", float)),
        "max_position_embeddings": _meta(meta, "llama.context_length", int),
        "rope_theta": float(_meta(meta, "llama.rope.freq_base", float, 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def hf_tensor_name(name: str) -> str:
    """The HF Llama state-dict name of GGUF tensor `name`; ValueError for unknown tensors."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".")
    if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit()
            and parts[2] in _LAYER_TENSORS and parts[3] == "weight"):
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.weight"
    raise ValueError(f"GGUF tensor {name!r}: not a Llama tensor this loader knows")


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert permute (each head's rows: pairs interleaved -> halves)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def dequantized(tensor: Any) -> torch.Tensor:
    """GGUF tensor -> float32 torch tensor [rows, cols] (PyTorch order); ValueError for types
    outside QUANT_TYPES."""
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in QUANT_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name!r}: unsupported type {kind} "
                         f"(supported: {', '.join(sorted(QUANT_TYPES))})")
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = dequantize(tensor.data, tensor.tensor_type)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"GGUF tensor {tensor.name!r}: {values.size} values for shape {shape} "
                         "(truncated file?)")
    array = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
    # F32 tensors come back as read-only views of the file's memory map.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _expected_shape(hf_name: str, cfg: Mapping[str, Any]) -> tuple[int, ...]:
    hidden, head_dim = cfg["hidden_size"], cfg["head_dim"]
    q, kv, ffn = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim, \
        cfg["intermediate_size"]
    for suffix, shape in ((".q_proj.weight", (q, hidden)), (".k_proj.weight", (kv, hidden)),
                          (".v_proj.weight", (kv, hidden)), (".o_proj.weight", (hidden, q)),
                          (".gate_proj.weight", (ffn, hidden)), (".up_proj.weight", (ffn, hidden)),
                          (".down_proj.weight", (hidden, ffn)), ("norm.weight", (hidden,)),
                          ("embed_tokens.weight", (cfg["vocab_size"], hidden)),
                          ("lm_head.weight", (cfg["vocab_size"], hidden))):
        if hf_name.endswith(suffix):
            return shape
    raise RuntimeError(f"no expected shape for {hf_name}")


def state_dict(reader: Any, cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized, renamed to HF, q/k un-permuted, shape-checked."""
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        weight = dequantized(tensor)
        expected = _expected_shape(name, cfg)
        if tuple(weight.shape) != expected:
            raise ValueError(f"GGUF tensor {tensor.name!r}: shape {tuple(weight.shape)}, "
                             f"expected {expected} from the metadata")
        if name.endswith("q_proj.weight"):
            weight = _unpermute(weight, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = _unpermute(weight, cfg["num_key_value_heads"])
        out[name] = weight
    return out


def convert_gguf(path: Path, out_dir: Path) -> Path:
    """Write `path` as an HF checkpoint directory `out_dir` (created); returns `out_dir`."""
    reader = open_gguf(path)
    meta = read_metadata(reader)
    cfg = hf_config(meta, {t.name for t in reader.tensors})
    try:
        parse_model_config(cfg)
        tokenizer = build_gguf_tokenizer(meta)
        weights = state_dict(reader, cfg)
    except ValueError as exc:
        raise ValueError(f"GGUF file {str(path)!r}: {exc}") from None
    missing = {"model.embed_tokens.weight", "model.norm.weight"} - set(weights)
    if missing:
        raise ValueError(f"GGUF file {str(path)!r}: missing tensors {sorted(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.backend.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        tokenizer.tokenizer_config(cfg["max_position_embeddings"]), indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
         "do_sample": False}, indent=2))
    # config.json last: its presence marks a complete directory.
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out_dir
