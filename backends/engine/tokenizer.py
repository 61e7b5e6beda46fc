"""Tokenizers: a thin wrapper over `tokenizers` (tokenizer.json) and the presets' byte-level one.

The byte-level tokenizer has one token per UTF-8 byte plus three specials; it is an ordinary
`tokenizer.json` (byte-level BPE without merges), so `transformers.AutoTokenizer` loads it too.
A tokenizer with a chat template (tokenizer_config.json's `chat_template`, a Jinja template as
in transformers) renders a conversation into a prompt with `apply_chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
BYTE_SPECIALS = (PAD, BOS, EOS)
NUM_BYTES = 256
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation; `role` is one of CHAT_ROLES."""

    role: str
    content: str


class Tokenizer:
    """Text <-> token ids. `encode` adds the tokenizer's own special tokens (e.g. a BOS)
    when its tokenizer.json post-processor says so; `decode` skips special tokens."""

    def __init__(self, backend: HFTokenizer, *, bos_token: str | None, eos_token: str,
                 chat_template: str | None = None) -> None:
        self._backend = backend
        self._bos_token, self._eos_token = bos_token, eos_token
        self.chat_template: str | None = chat_template
        self._compiled_template: Any = None
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer: eos_token {eos_token!r} is not in the vocabulary")
        self.eos_token_id: int = eos_id
        self.bos_token_id: int | None = (
            backend.token_to_id(bos_token) if bos_token is not None else None
        )
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, directory: str | Path, *, eos_fallback_id: int | None = None) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json for bos/eos) from an HF directory."""
        path = Path(directory)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"checkpoint directory {str(path)!r}: missing file 'tokenizer.json'")
        backend = HFTokenizer.from_file(str(tok_file))
        cfg_file = path / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        bos = _token_text(cfg.get("bos_token"))
        eos = _token_text(cfg.get("eos_token"))
        if eos is None and eos_fallback_id is not None:
            eos = backend.id_to_token(eos_fallback_id)
        if eos is None:
            raise ValueError(
                f"checkpoint directory {str(path)!r}: no eos_token in tokenizer_config.json "
                "and no eos_token_id in config.json"
            )
        template = cfg.get("chat_template")
        return cls(backend, bos_token=bos, eos_token=eos,
                   chat_template=template if isinstance(template, str) else None)

    def encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[ChatMessage], *,
                            add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (special tokens spelled out; `encode` keeps them
        whole). ValueError when there is no template, no message or an unknown role."""
        if self.chat_template is None:
            raise ValueError("apply_chat_template: this model's tokenizer has no chat template")
        if not messages:
            raise ValueError("apply_chat_template: messages is empty")
        for message in messages:
            if message.role not in CHAT_ROLES:
                raise ValueError(f"apply_chat_template: role {message.role!r} is not one of "
                                 f"{', '.join(CHAT_ROLES)}")
        if self._compiled_template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._compiled_template = env.from_string(self.chat_template)
        return str(self._compiled_template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_token or "", eos_token=self._eos_token))

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json into `directory` (the config file is the caller's)."""
        self._backend.save(str(Path(directory) / "tokenizer.json"))


def _raise_template_error(message: str) -> None:
    raise ValueError(f"apply_chat_template: {message}")


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def byte_level_tokenizer() -> Tokenizer:
    """Ids 0..2 are <pad>, <bos>, <eos>; id 3 + b is the byte b. vocab_size == 259."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable char; list them in byte order.
    mapping = _bytes_to_unicode()
    if sorted(mapping.values()) != sorted(byte_chars):
        raise RuntimeError("tokenizers' ByteLevel alphabet differs from the GPT-2 byte map")
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    for b in range(NUM_BYTES):
        vocab[mapping[b]] = len(BYTE_SPECIALS) + b
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(BYTE_SPECIALS))
    return Tokenizer(backend, bos_token=BOS, eos_token=EOS)


def byte_level_tokenizer_config(model_max_length: int) -> dict[str, object]:
    """tokenizer_config.json content that lets transformers' AutoTokenizer load the presets."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(NUM_BYTES):
        if b not in printable:
            printable.append(b)
            chars.append(NUM_BYTES + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}
