"""Block-transfer wire messages (framing in kvbridge.protocol).

Flow on one connection: client Hello -> HelloAck; client PullRequest; then for each layer in
order, its chunks: ChunkHeader frame followed by ``nbytes`` raw bytes (crc32 of those bytes
when the request asked for checksums, else 0); finally client PullDone. The server may send
ErrorReply instead of any ChunkHeader and then closes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbridge.protocol import message

MAX_PULL_TIMEOUT_S = 3600.0


@message("pull")
@dataclass(frozen=True, slots=True)
class PullRequest:
    """Pull a published transfer (``transfer_id``) or, with an empty id, pool ``slots``."""

    transfer_id: str
    slots: tuple[int, ...]
    num_layers: int
    layer_nbytes: int
    timeout_s: float
    checksum: bool

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.layer_nbytes < 1:
            raise ValueError(f"num_layers/layer_nbytes: expected >= 1, got {self.num_layers}/{self.layer_nbytes}")
        if not 0 < self.timeout_s <= MAX_PULL_TIMEOUT_S:
            raise ValueError(f"timeout_s: expected in (0, {MAX_PULL_TIMEOUT_S}], got {self.timeout_s}")
        if not self.transfer_id and not self.slots:
            raise ValueError("transfer_id/slots: one of them is required")


@message("chunk")
@dataclass(frozen=True, slots=True)
class ChunkHeader:
    layer: int
    offset: int
    nbytes: int
    crc32: int


@message("pull_done")
@dataclass(frozen=True, slots=True)
class PullDone:
    num_layers: int
