"""Master wire messages (see kvbridge.protocol for framing). Hashes are raw digest bytes."""

from __future__ import annotations

from dataclasses import dataclass

from kvbridge.protocol import message, record


def _non_negative(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name}: expected >= 0, got {value}")


@record
@dataclass(frozen=True, slots=True)
class LoadReport:
    """A node's load: waiting requests, running sequences, free KV blocks."""

    queue_len: int = 0
    num_running: int = 0
    num_free_blocks: int = 0

    def __post_init__(self) -> None:
        _non_negative("queue_len", self.queue_len)
        _non_negative("num_running", self.num_running)
        _non_negative("num_free_blocks", self.num_free_blocks)


@message("register")
@dataclass(frozen=True, slots=True)
class RegisterNode:
    """Joins (or re-joins) the cluster; ``endpoint`` is the node's block server "host:port"."""

    node_id: str
    endpoint: str
    load: LoadReport


@message("heartbeat")
@dataclass(frozen=True, slots=True)
class Heartbeat:
    node_id: str
    load: LoadReport


@message("insert")
@dataclass(frozen=True, slots=True)
class InsertBlocks:
    """Batch insert: ``node_id`` now holds these blocks (chained hashes) in ``tier``."""

    node_id: str
    tier: str
    block_hashes: tuple[bytes, ...]


@message("remove")
@dataclass(frozen=True, slots=True)
class RemoveBlocks:
    """Eviction event: ``node_id`` no longer holds these blocks in ``tier``."""

    node_id: str
    tier: str
    block_hashes: tuple[bytes, ...]


@message("lookup")
@dataclass(frozen=True, slots=True)
class Lookup:
    """Longest-prefix lookup of a block-hash chain (first block first)."""

    block_hashes: tuple[bytes, ...]


@record
@dataclass(frozen=True, slots=True)
class NodeMatch:
    """``node_id`` holds the first ``num_blocks`` blocks of the looked-up chain."""

    node_id: str
    endpoint: str
    num_blocks: int


@message("lookup_reply")
@dataclass(frozen=True, slots=True)
class LookupReply:
    """Matches with num_blocks >= 1, longest first, ties by node id."""

    matches: tuple[NodeMatch, ...]


@message("list_nodes")
@dataclass(frozen=True, slots=True)
class ListNodes:
    pass


@record
@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    endpoint: str
    load: LoadReport
    num_blocks: int
    seconds_since_heartbeat: float


@message("nodes_reply")
@dataclass(frozen=True, slots=True)
class NodesReply:
    """Live nodes sorted by node id."""

    nodes: tuple[NodeInfo, ...]
