"""The disaggregated KV path of a pd_worker: its engine wired to a kvbridge node.

``build_worker(spec, model_name)`` loads the model, sizes a KVNode from the model's KV
layout, builds the engine with the node's StoreKVHooks (local prefix reuse) and returns both
with a ``NodeTransfer``: the worker's KVTransfer (publish a prefill's KV → handle bytes;
open a handle → KVSource), registered with the master when KVBRIDGE_MASTER is set. Pool size: ``PD_KV_POOL_BLOCKS`` (default twice the engine's blocks).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from backends.engine.outputs import KVExport
from backends.serving.engine_spec import EngineSpec
from backends.serving.kv_master import MasterLink, connect, start_master_if_needed, worker_node_id
from backends.serving.kv_node import KVNode, KVNodeConfig
from backends.serving.kv_remote import LOOKUP_TIMEOUT_S, PrefixSource, RemoteFinder
from backends.serving.kv_source import DeviceKVSource, PulledKVSource
from backends.serving.worker import PublishedKV
from kvbridge.handle import KVLayoutSpec
from kvbridge.master.messages import LoadReport, NodeMatch

POOL_BLOCKS_ENV = "PD_KV_POOL_BLOCKS"
__all__ = ["NodeTransfer", "build_worker", "start_master_if_needed"]


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What a worker reports to the master: requests waiting, running, free engine blocks."""

    queue_len: int
    num_running: int
    num_free_blocks: int


class NodeTransfer:
    """The worker's KVTransfer over a KVNode (+ an optional MasterLink). Engine thread only,
    except ``start_heartbeats`` and ``close``."""

    def __init__(self, node: KVNode, link: MasterLink | None, finder: RemoteFinder | None = None) -> None:
        self.node = node
        self.link = link
        self.finder = finder

    def find_remote(self, prompt_ids: Sequence[int]) -> NodeMatch | None:
        """Another node holding a longer usable prefix of the prompt, per the master (any
        thread; bounded by the finder's deadline). None without a master."""
        if self.finder is None:
            return None
        usable = (len(prompt_ids) - 1) // self.node.layout.block_size
        return self.finder.find(self.node.hashes(prompt_ids[:usable * self.node.layout.block_size]))

    def prefix_source(self, request_id: str, prompt_ids: Sequence[int], remote: NodeMatch) -> PrefixSource | None:
        return self.node.prefix_source(request_id, prompt_ids, remote)

    def publish(self, export: KVExport, prompt_ids: Sequence[int]) -> PublishedKV:
        published = self.node.publish(export, prompt_ids)
        return PublishedKV(published.handle.to_bytes(), published.num_bytes, published.elapsed_ns)

    def source(self, handle: bytes) -> PulledKVSource | DeviceKVSource:
        return self.node.source(handle)

    @property
    def import_counts(self) -> dict[str, int]:
        """KV imports completed, by path ("device": from a same-GPU peer's cache; "host")."""
        return dict(self.node.import_counts)

    def maintain(self) -> None:
        self.node.maintain()

    def discard(self, request_id: str) -> None:
        self.node.discard(request_id)

    def start_heartbeats(self, load: Callable[[], WorkerLoad]) -> None:
        if self.link is not None:
            self.link.start(self.node.endpoint, lambda: LoadReport(*_fields(load())))

    def close(self) -> None:
        if self.finder is not None:
            self.finder.close()
        if self.link is not None:
            self.link.close()
        self.node.close()


def _fields(load: WorkerLoad) -> tuple[int, int, int]:
    return load.queue_len, load.num_running, load.num_free_blocks


def layout_of(loaded: Any, spec: EngineSpec) -> KVLayoutSpec:
    """The KV layout an engine over ``loaded`` with ``spec`` will have."""
    import torch

    elem = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    mc = loaded.config
    return KVLayoutSpec(spec.dtype, mc.num_layers, spec.block_size, mc.kv_width, mc.kv_width * elem)


def node_config(node_id: str, model_id: str, engine_blocks: int) -> KVNodeConfig:
    raw = os.environ.get(POOL_BLOCKS_ENV, "")
    if raw and not raw.isdigit():
        raise ValueError(f"{POOL_BLOCKS_ENV}: expected a positive integer, got {raw!r}")
    pool_blocks = int(raw) if raw else max(2 * engine_blocks, 64)
    return KVNodeConfig(node_id, model_id, pool_blocks, pool_blocks // 2)


def _node(model_name: str, model_id: str, engine_blocks: int, layout: KVLayoutSpec) -> NodeTransfer:
    node_id = worker_node_id(model_name)
    client = connect(node_id)
    link = MasterLink(client) if client is not None else None
    node = KVNode(node_config(node_id, model_id, engine_blocks), layout,
                  listener=link.on_event if link is not None else None)
    lookups = connect(node_id, LOOKUP_TIMEOUT_S)
    return NodeTransfer(node, link, RemoteFinder(lookups, node_id) if lookups is not None else None)


def build_worker(spec: EngineSpec, model_name: str) -> tuple[Any, NodeTransfer]:
    """(engine with the node's hooks, its transfer). ValueError for a bad spec."""
    from backends.engine.loader import load_model
    from backends.serving.engine_factory import build_engine, torch_dtype

    loaded = load_model(spec.source, dtype=torch_dtype(spec.dtype), device=spec.device)
    layout = layout_of(loaded, spec)
    transfer = _node(model_name, spec.source, spec.num_blocks, layout)
    try:
        engine = build_engine(spec, loaded=loaded, hooks=transfer.node.hooks)
        if KVLayoutSpec.of(engine.kv_layout) != layout:
            raise RuntimeError(f"engine KV layout {engine.kv_layout} differs from the node's {layout}")
        if engine.cache_access.kv_caches[0].is_cuda:  # same-GPU peers read it device to device
            transfer.node.attach_device(engine.block_manager, engine.cache_access.kv_caches)
    except BaseException:
        transfer.close()
        raise
    return engine, transfer
