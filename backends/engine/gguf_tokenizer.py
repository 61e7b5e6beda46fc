"""A `tokenizers` tokenizer built from a GGUF file's `tokenizer.*` metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`,
already spelled in GPT-2's byte alphabet for byte-level BPE), the merges, each token's type
(1 normal, 3 control, 4 user-defined), the special token ids and the chat template. Only
byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported; the pre-tokenizer follows
`tokenizer.ggml.pre` as llama.cpp does (see PRE_TOKENIZERS).
`build_gguf_tokenizer` raises ValueError naming the metadata key and value it cannot use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

CONTROL, USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _split_then_bytes(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    return lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # SmolLM's own tokenizer.json (and llama.cpp's "smollm"): every digit alone, then GPT-2.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


# `tokenizer.ggml.pre` -> the pre-tokenizer its merges were learned with (llama.cpp's names).
PRE_TOKENIZERS: Mapping[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2,
    "gpt-2": _gpt2,
    "smollm": _digits_then_gpt2,
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
}


@dataclass(frozen=True, slots=True)
class GGUFTokenizer:
    """The built tokenizer and what tokenizer_config.json needs (token texts, not ids)."""

    backend: HFTokenizer
    bos_token: str | None
    eos_token: str
    pad_token: str | None
    add_bos_token: bool
    chat_template: str | None

    def tokenizer_config(self, model_max_length: int) -> dict[str, Any]:
        """tokenizer_config.json content (transformers' AutoTokenizer reads it too)."""
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "add_bos_token": self.add_bos_token,
            "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length, "chat_template": self.chat_template,
        }


def _token_at(tokens: Sequence[str], meta: Mapping[str, Any], key: str) -> str | None:
    token_id = meta.get(key)
    if token_id is None:
        return None
    if not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
        raise ValueError(f"GGUF metadata {key}: {token_id!r} is not a token id "
                         f"(vocabulary of {len(tokens)})")
    return tokens[token_id]


def _list(meta: Mapping[str, Any], key: str) -> list[Any]:
    value = meta.get(key)
    if not isinstance(value, list) or not value:
        raise ValueError(f"GGUF metadata {key}: missing or empty")
    return value


def build_gguf_tokenizer(meta: Mapping[str, Any]) -> GGUFTokenizer:
    """`meta` maps GGUF keys (e.g. 'tokenizer.ggml.tokens') to decoded values."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF metadata tokenizer.ggml.model: unsupported {kind!r} "
                         "(supported: 'gpt2', byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF metadata tokenizer.ggml.pre: unsupported {pre!r} "
                         f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens: list[str] = _list(meta, "tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"GGUF metadata tokenizer.ggml.token_type: {len(types)} entries for "
                         f"{len(tokens)} tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types, strict=True) if k == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED])
    eos = _token_at(tokens, meta, "tokenizer.ggml.eos_token_id")
    if eos is None:
        raise ValueError("GGUF metadata tokenizer.ggml.eos_token_id: missing")
    bos = _token_at(tokens, meta, "tokenizer.ggml.bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos:
        if bos is None:
            raise ValueError("GGUF metadata tokenizer.ggml.add_bos_token is true but "
                             "tokenizer.ggml.bos_token_id is missing")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokens.index(bos))])
    template = meta.get("tokenizer.chat_template")
    return GGUFTokenizer(backend, bos, eos, _token_at(tokens, meta, "tokenizer.ggml.padding_token_id"),
                         add_bos, template if isinstance(template, str) else None)
