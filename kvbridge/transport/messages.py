"""Block-server wire messages (framing in kvbridge.protocol).

A connection authenticates once (client Hello -> HelloAck) and then carries any number of
requests, one at a time, so clients pool their connections:

- pull: client PullRequest; then the payload (layers back to back, in order) in chunks: a
  ChunkHeader frame (where the chunk starts: layer, offset) followed by ``nbytes`` raw bytes,
  which may run on into the next layers when the producer has published them (``checksum`` is the xxh3_64 of those bytes when the
  request asked for checksums, else 0); for a published transfer, finally client PullDone
  (a pull of pool slots ends with its last chunk: one wake-up less per pull).
  A pull of pool slots with ``num_held`` > 0 pins every slot named but streams only
  ``slots[num_held:]`` (the consumer holds the first ones), so the pin and unpin the
  producer's node sees are those of a whole pull.
- pin (shm pull by handle): client PinRequest; the server pins the slots and answers
  PinGranted (with the pool to map); the client copies from the shared pool and sends Unpin.
  The server unpins on Unpin, on the pin's deadline, or when the connection drops.

Slots are pinned by (slot, generation) when the request carries ``gens`` (a KV handle's
``block_gens``): a slot freed or handed out again since the handle was built is stale, and the
server answers ErrorReply("stale", ...) having pinned nothing. A pull or pin by slot always
carries them.

- resolve (cross-node prefix reuse): client ResolveRequest with a chain of block hashes; the
  server answers ResolveReply with the pool slots and generations of the longest prefix of that
  chain its node holds in the served pool (none: empty), pinning nothing. The client then pulls
  or pins those slots by generation like any others: a slot reused meanwhile is refused as stale.

The server may answer ErrorReply instead of any ChunkHeader or PinGranted; it then closes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbridge.pool import PoolHandle
from kvbridge.protocol import message

MAX_PULL_TIMEOUT_S = 3600.0


def _check_timeout(timeout_s: float) -> None:
    if not 0 < timeout_s <= MAX_PULL_TIMEOUT_S:
        raise ValueError(f"timeout_s: expected in (0, {MAX_PULL_TIMEOUT_S}], got {timeout_s}")


def _check_gens(gens: tuple[int, ...], slots: tuple[int, ...]) -> None:
    if len(gens) != len(slots):
        raise ValueError(f"gens: expected {len(slots)} generations (one per slot), got {len(gens)}")
    if any(gen < 0 for gen in gens):
        raise ValueError(f"gens: expected generations >= 0, got {list(gens)[:16]}")


@message("pull")
@dataclass(frozen=True, slots=True)
class PullRequest:
    """Pull a published transfer (``transfer_id``) or, with an empty id, ``slots`` of the
    served pool (named ``pool_name``; '' skips that check) that still have generations
    ``gens`` (one per slot, required; a published transfer has none). ``num_held``: the
    first slots are pinned for the pull but not sent (``layer_nbytes`` counts the rest)."""

    transfer_id: str
    slots: tuple[int, ...]
    pool_name: str
    num_layers: int
    layer_nbytes: int
    timeout_s: float
    checksum: bool
    gens: tuple[int, ...] = ()
    num_held: int = 0

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.layer_nbytes < 1:
            raise ValueError(f"num_layers/layer_nbytes: expected >= 1, got {self.num_layers}/{self.layer_nbytes}")
        _check_timeout(self.timeout_s)
        if not self.transfer_id and not self.slots:
            raise ValueError("transfer_id/slots: one of them is required")
        if self.transfer_id:
            if self.gens:
                raise ValueError("gens: a published transfer is pulled by id, not by slot generations")
            if self.num_held:
                raise ValueError(f"num_held: a published transfer moves all it publishes, got {self.num_held}")
        else:
            _check_gens(self.gens, self.slots)
            if not 0 <= self.num_held < len(self.slots):
                raise ValueError(f"num_held: expected 0..{len(self.slots) - 1} (some slot must move), got {self.num_held}")


@message("chunk")
@dataclass(frozen=True, slots=True)
class ChunkHeader:
    layer: int
    offset: int
    nbytes: int
    checksum: int


@message("pull_done")
@dataclass(frozen=True, slots=True)
class PullDone:
    num_layers: int


@message("pin")
@dataclass(frozen=True, slots=True)
class PinRequest:
    """Pin ``slots`` of the served pool (named ``pool_name``) for at most ``timeout_s``, if
    they still have generations ``gens`` (one per slot, required)."""

    pool_name: str
    slots: tuple[int, ...]
    timeout_s: float
    gens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.slots:
            raise ValueError("slots: expected at least one slot to pin")
        _check_timeout(self.timeout_s)
        _check_gens(self.gens, self.slots)


@message("pin_granted")
@dataclass(frozen=True, slots=True)
class PinGranted:
    pool: PoolHandle


@message("unpin")
@dataclass(frozen=True, slots=True)
class Unpin:
    num_slots: int


MAX_RESOLVE_BLOCKS = 65536


@message("resolve")
@dataclass(frozen=True, slots=True)
class ResolveRequest:
    block_hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not 0 < len(self.block_hashes) <= MAX_RESOLVE_BLOCKS:
            raise ValueError(f"block_hashes: expected 1..{MAX_RESOLVE_BLOCKS} hashes, got {len(self.block_hashes)}")


@message("resolved")
@dataclass(frozen=True, slots=True)
class ResolveReply:
    """The longest held prefix: its pool (empty when nothing is held), slots and generations."""

    pool_name: str
    slots: tuple[int, ...]
    gens: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_gens(self.gens, self.slots)
