"""kvbridge: a radix-indexed paged KV block store with a master index and layer-wise transports.

Never imports Triton; the index, hashing and protocol modules never import torch.

The public names below are what code outside kvbridge (the serving layer) may import, from
``kvbridge`` itself: the node (``KVNode`` and its one config), the master (its client, and the
in-process server a launcher starts), the value types those take and return, and the errors a
caller handles. Everything else is kvbridge's own business. Each name is imported on first
use, so ``import kvbridge`` alone imports neither torch nor the transports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvbridge.errors import KVBridgeError, PullFailed
    from kvbridge.etcd import EtcdConfig
    from kvbridge.handle import KVLayoutSpec
    from kvbridge.hashing import BlockHash, hash_blocks
    from kvbridge.master.client import MasterClient
    from kvbridge.master.messages import LoadReport, NodeMatch
    from kvbridge.master.server import MasterConfig, MasterThread
    from kvbridge.membership import DuplicateNodeId
    from kvbridge.node import KVNode
    from kvbridge.node_config import KVNodeConfig, Published

_EXPORTS: dict[str, str] = {
    "KVNode": "kvbridge.node",
    "KVNodeConfig": "kvbridge.node_config",
    "Published": "kvbridge.node_config",
    "KVLayoutSpec": "kvbridge.handle",
    "BlockHash": "kvbridge.hashing",
    "hash_blocks": "kvbridge.hashing",
    "MasterClient": "kvbridge.master.client",
    "MasterConfig": "kvbridge.master.server",
    "MasterThread": "kvbridge.master.server",
    "LoadReport": "kvbridge.master.messages",
    "NodeMatch": "kvbridge.master.messages",
    "KVBridgeError": "kvbridge.errors",
    "EtcdConfig": "kvbridge.etcd",
    "DuplicateNodeId": "kvbridge.membership",
    "PullFailed": "kvbridge.errors",
}
__all__ = [
    "BlockHash",
    "DuplicateNodeId",
    "EtcdConfig",
    "KVBridgeError",
    "KVLayoutSpec",
    "KVNode",
    "KVNodeConfig",
    "LoadReport",
    "MasterClient",
    "MasterConfig",
    "MasterThread",
    "NodeMatch",
    "Published",
    "PullFailed",
    "hash_blocks",
]


if sorted(_EXPORTS) != __all__:
    raise RuntimeError("kvbridge: __all__ and the lazy export table disagree")


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvbridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
