"""Compatibility name: the radix index's value types live beside it in kvbridge/radix.py.

Kept because backends/serving/kv_master.py imports ``BlockStored`` from here; new code imports
kvbridge.radix.
"""

from kvbridge.radix import (
    BlockRemoved,
    BlockStored,
    Chain,
    EvictedBlock,
    MatchResult,
    Node,
    RadixEvent,
    RadixListener,
)

__all__ = [
    "BlockRemoved",
    "BlockStored",
    "Chain",
    "EvictedBlock",
    "MatchResult",
    "Node",
    "RadixEvent",
    "RadixListener",
]
