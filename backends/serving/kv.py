"""The disaggregated KV path of a pd_worker: its engine wired to a kvbridge node.

``build_worker(spec, model_name)`` loads the model, sizes a kvbridge KVNode from the model's KV
layout (pool size: ``PD_KV_POOL_BLOCKS``, default twice the engine's blocks; a cold history
tier of ``PD_KV_COLD_BLOCKS`` blocks in the worker's memory, default none; the master named by
KVBRIDGE_MASTER, if set), builds the engine with the node's hooks (local prefix reuse) and
returns both with a ``NodeTransfer``: the worker's KVTransfer over the node (publish a
prefill's KV → handle bytes; open a handle, or a remote prefix, → an engine KVSource).
kvbridge's sources raise PullFailed; ``EngineSource`` maps that to the engine's KVImportError.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from backends.engine.hooks import KVImportError
from backends.engine.outputs import KVExport
from backends.serving.engine_spec import EngineSpec
from backends.serving.kv_master import (
    master_address,
    master_token,
    start_master_if_needed,
    worker_node_id,
)
from backends.serving.worker import PublishedKV
from kvbridge import KVLayoutSpec, KVNode, KVNodeConfig, LoadReport, NodeMatch, PullFailed

POOL_BLOCKS_ENV = "PD_KV_POOL_BLOCKS"
COLD_BLOCKS_ENV = "PD_KV_COLD_BLOCKS"
__all__ = ["EngineSource", "NodeTransfer", "WorkerLoad", "build_worker", "start_master_if_needed"]


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What a worker reports to the master: requests waiting, running, free engine blocks."""

    queue_len: int
    num_running: int
    num_free_blocks: int


class EngineSource:
    """A kvbridge KV source as the engine's KVSource: PullFailed becomes KVImportError (the
    engine recomputes either way; KVImportError is the expected failure it logs without a
    traceback). ``inner`` is the kvbridge source; ``close()`` closes it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.num_tokens: int = inner.num_tokens

    @property
    def elapsed_ns(self) -> int:
        return int(self.inner.elapsed_ns)

    @property
    def num_pulled_bytes(self) -> int:
        """The KV bytes the import moves between nodes (only the blocks this node lacked)."""
        return int(self.inner.num_pulled_bytes)

    def read_layer(self, layer: int, dst: torch.Tensor, deadline: float) -> None:
        try:
            self.inner.read_layer(layer, dst, deadline)
        except PullFailed as exc:
            raise KVImportError(str(exc)) from exc

    def close(self) -> None:
        self.inner.close()


class NodeTransfer:
    """The worker's KVTransfer over a KVNode. Engine thread only, except ``find_remote``,
    ``start_heartbeats`` and ``close``."""

    def __init__(self, node: KVNode) -> None:
        self.node = node

    def find_remote(self, prompt_ids: Sequence[int]) -> NodeMatch | None:
        """Another node holding a longer usable prefix of the prompt, per the master (any
        thread; bounded by the lookup deadline). None without a master."""
        return self.node.find_remote(prompt_ids)

    def prefix_source(self, request_id: str, prompt_ids: Sequence[int], remote: NodeMatch) -> EngineSource | None:
        source = self.node.pull(request_id, prompt_ids, remote)
        return None if source is None else EngineSource(source)

    def publish(self, export: KVExport, prompt_ids: Sequence[int]) -> PublishedKV:
        published = self.node.publish(export, prompt_ids)
        return PublishedKV(published.handle.to_bytes(), published.num_bytes, published.elapsed_ns)

    def source(self, handle: bytes) -> EngineSource:
        return EngineSource(self.node.open(handle))

    @property
    def import_counts(self) -> dict[str, int]:
        """KV imports completed, by path ("device": from a same-GPU peer's cache; "host"; "remote")."""
        return dict(self.node.import_counts)

    def maintain(self) -> None:
        self.node.maintain()

    def discard(self, request_id: str) -> None:
        self.node.discard(request_id)

    def start_heartbeats(self, load: Callable[[], WorkerLoad]) -> None:
        self.node.start_heartbeats(lambda: LoadReport(*_fields(load())))

    def close(self) -> None:
        self.node.close()


def _fields(load: WorkerLoad) -> tuple[int, int, int]:
    return load.queue_len, load.num_running, load.num_free_blocks


def layout_of(loaded: Any, spec: EngineSpec) -> KVLayoutSpec:
    """The KV layout an engine over ``loaded`` with ``spec`` will have."""
    elem = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    mc = loaded.config
    return KVLayoutSpec(spec.dtype, mc.num_layers, spec.block_size, mc.kv_width, mc.kv_width * elem)


def _env_blocks(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw and not raw.isdigit():
        raise ValueError(f"{name}: expected a positive integer, got {raw!r}")
    return int(raw) if raw else default


def node_config(node_id: str, model_id: str, engine_blocks: int) -> KVNodeConfig:
    """The worker's node: sizes from the environment (see the module docstring), the master
    from KVBRIDGE_MASTER / KVBRIDGE_TOKEN. ValueError naming the variable for a bad value."""
    pool_blocks = _env_blocks(POOL_BLOCKS_ENV, max(2 * engine_blocks, 64))
    return KVNodeConfig(node_id, model_id, pool_blocks, pool_blocks // 2,
                        cold_capacity_blocks=_env_blocks(COLD_BLOCKS_ENV, 0),
                        master_address=master_address(), master_token=master_token())


def build_worker(spec: EngineSpec, model_name: str) -> tuple[Any, NodeTransfer]:
    """(engine with the node's hooks, its transfer). ValueError for a bad spec."""
    from backends.engine.loader import load_model
    from backends.serving.engine_factory import build_engine, torch_dtype

    loaded = load_model(spec.source, dtype=torch_dtype(spec.dtype), device=spec.device)
    layout = layout_of(loaded, spec)
    transfer = NodeTransfer(KVNode(node_config(worker_node_id(model_name), spec.source, spec.num_blocks), layout))
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
