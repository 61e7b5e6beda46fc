"""Chained block hashes: the identity of a full KV block and of the whole prefix before it.

A block hash covers (parent block hash, the block's token ids, an extra key namespace such as
the model id or LoRA name), so equal hashes mean equal prefixes. The encoding is canonical
(little-endian int32 tokens, length-prefixed fields, a versioned domain tag) and uses blake2b,
so every process and every host computes the same bytes. Python's ``hash()`` is never used.
Only full blocks are hashed; a trailing partial block has no hash.

Imports no torch.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

HASH_NBYTES = 32
_DOMAIN = b"kvbridge.block.v1"
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


def _extra_key_bytes(extra_key: bytes | str) -> bytes:
    if isinstance(extra_key, str):
        return extra_key.encode("utf-8")
    if isinstance(extra_key, bytes):
        return extra_key
    raise ValueError(f"extra_key must be bytes or str, got {type(extra_key).__name__}")


def _namespace_hasher(extra_key: bytes | str) -> hashlib.blake2b:
    """A hasher already fed with the domain tag and the extra key (copied once per block)."""
    key = _extra_key_bytes(extra_key)
    hasher = hashlib.blake2b(digest_size=HASH_NBYTES)
    hasher.update(_DOMAIN)
    hasher.update(struct.pack("<I", len(key)))
    hasher.update(key)
    return hasher


def _pack_tokens(token_ids: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<I{len(token_ids)}i", len(token_ids), *token_ids)
    except struct.error as exc:
        bad = [t for t in token_ids if not isinstance(t, int) or not _INT32_MIN <= t <= _INT32_MAX]
        raise ValueError(f"token_ids must be int32 values, got {bad[:4]!r}") from exc


def _digest(base: hashlib.blake2b, parent_hash: BlockHash | None, packed: bytes) -> BlockHash:
    hasher = base.copy()
    if parent_hash is None:
        hasher.update(b"\x00")
    else:
        hasher.update(b"\x01")
        hasher.update(parent_hash)
    hasher.update(packed)
    return BlockHash(hasher.digest())


def hash_block(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_key: bytes | str = b""
) -> BlockHash:
    """Hash of one block given its parent's hash (None for the first block of a sequence)."""
    if parent_hash is not None and len(parent_hash) != HASH_NBYTES:
        raise ValueError(f"parent_hash must be {HASH_NBYTES} bytes, got {len(parent_hash)}")
    return _digest(_namespace_hasher(extra_key), parent_hash, _pack_tokens(token_ids))


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_key: bytes | str = b"",
    parent_hash: BlockHash | None = None,
) -> list[BlockHash]:
    """Chained hashes of every *full* block of ``token_ids`` (a partial tail block is skipped).

    ``parent_hash`` continues an existing chain (the hash of the block before token_ids[0]).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    base = _namespace_hasher(extra_key)
    num_full = len(token_ids) // block_size
    packed_all = _pack_tokens(token_ids[: num_full * block_size])[4:]
    header = struct.pack("<I", block_size)
    stride = 4 * block_size
    hashes: list[BlockHash] = []
    parent = parent_hash
    for i in range(num_full):
        parent = _digest(base, parent, header + packed_all[i * stride : (i + 1) * stride])
        hashes.append(parent)
    return hashes
