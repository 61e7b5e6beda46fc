"""The disaggregated KV path of a pd_worker: its engine wired to a kvbridge node.

``build_worker(spec, model_name)`` loads the model, sizes a kvbridge KVNode from the model's KV
layout (pool size: ``PD_KV_POOL_BLOCKS``, default twice the engine's blocks; a cold history
tier of ``PD_KV_COLD_BLOCKS`` blocks in the worker's memory, default none; the master named by
KVBRIDGE_MASTER, if set), builds the engine with the node's hooks (local prefix reuse) and
returns both with a ``NodeTransfer``: the worker's KVTransfer over the node (publish a
prefill's KV → handle bytes; open a handle, or a remote prefix, → an engine KVSource).
kvbridge's sources raise PullFailed; ``EngineSource`` maps that to the engine's KVImportError.
``start_worker`` starts the worker's service and registers its node; ``NodeTransfer.cluster_stats``
counts what the node did with the cluster (prefix lookups, prefix imports from other nodes).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from backends.engine.hooks import KVImportError
from backends.engine.outputs import KVExport
from backends.serving.engine_spec import EngineSpec
from backends.serving.kv_master import (
    local_model,
    master_address,
    master_token,
    start_master_if_needed,
    worker_node_id,
)
from backends.serving.worker import PublishedKV, WorkerService
from kvbridge import KVLayoutSpec, KVNode, KVNodeConfig, LoadReport, NodeMatch, PullFailed

POOL_BLOCKS_ENV = "PD_KV_POOL_BLOCKS"
COLD_BLOCKS_ENV = "PD_KV_COLD_BLOCKS"
__all__ = ["ClusterStats", "EngineSource", "NodeTransfer", "RemotePulls", "WorkerLoad", "build_worker",
           "start_master_if_needed", "start_worker"]
OTHER_SERVER = "other_server"  # a prefix import's origin: a node of another server
SAME_SERVER = "same_server"    # another worker's node of this server


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What a worker reports to the master: requests waiting, running, free engine blocks."""

    queue_len: int
    num_running: int
    num_free_blocks: int


class RemotePulls(NamedTuple):
    """Completed prefix imports from other nodes of one ``origin`` (OTHER_SERVER, SAME_SERVER):
    requests, KV bytes moved (only the blocks this node lacked), pull time."""

    origin: str
    num_requests: int
    num_bytes: int
    elapsed_ns: int


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """A worker node's dealings with the cluster since it started (counters): prefix lookups
    the master answered within the lookup deadline, lookups it missed (late or failed; lookups
    skipped during the cooldown after a miss are not counted), and completed prefix imports by
    origin (one entry per origin seen, sorted)."""

    num_lookups_answered: int = 0
    num_lookups_missed: int = 0
    pulls: tuple[RemotePulls, ...] = ()


class EngineSource:
    """A kvbridge KV source as the engine's KVSource: PullFailed becomes KVImportError (the
    engine recomputes either way; KVImportError is the expected failure it logs without a
    traceback). ``inner`` is the kvbridge source; ``close()`` closes it. ``on_done(bytes,
    elapsed_ns)`` is called once, on the import thread that read the last layer."""

    def __init__(self, inner: Any, on_done: Callable[[int, int], None] | None = None) -> None:
        self.inner = inner
        self.num_tokens: int = inner.num_tokens
        self._on_done = on_done

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
        if self._on_done is not None and self.inner.elapsed_ns:  # the last layer arrived
            on_done, self._on_done = self._on_done, None
            on_done(self.num_pulled_bytes, self.elapsed_ns)

    def close(self) -> None:
        self.inner.close()


class NodeTransfer:
    """The worker's KVTransfer over a KVNode. Engine thread only, except ``find_remote``,
    ``start_heartbeats`` and ``close``."""

    def __init__(self, node: KVNode) -> None:
        self.node = node
        self._pulls: dict[str, RemotePulls] = {}  # origin -> totals; import threads add
        self._pulls_lock = threading.Lock()

    def find_remote(self, prompt_ids: Sequence[int]) -> NodeMatch | None:
        """Another node holding a longer usable prefix of the prompt, per the master (any
        thread; bounded by the lookup deadline). None without a master."""
        return self.node.find_remote(prompt_ids)

    def prefix_source(self, request_id: str, prompt_ids: Sequence[int], remote: NodeMatch) -> EngineSource | None:
        source = self.node.pull(request_id, prompt_ids, remote)
        if source is None:
            return None
        origin = SAME_SERVER if local_model(remote.node_id) is not None else OTHER_SERVER
        return EngineSource(source, lambda num_bytes, elapsed_ns: self._pulled(origin, num_bytes, elapsed_ns))

    def _pulled(self, origin: str, num_bytes: int, elapsed_ns: int) -> None:
        with self._pulls_lock:
            _, requests, total_bytes, total_ns = self._pulls.get(origin, RemotePulls(origin, 0, 0, 0))
            self._pulls[origin] = RemotePulls(origin, requests + 1, total_bytes + num_bytes, total_ns + elapsed_ns)

    @property
    def cluster_stats(self) -> ClusterStats:
        """See ClusterStats (any thread)."""
        finder = self.node.finder
        answered, missed = (finder.answered, finder.failures) if finder is not None else (0, 0)
        with self._pulls_lock:
            pulls = tuple(sorted(self._pulls.values()))
        return ClusterStats(answered, missed, pulls)

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


def start_worker(engine: Any, transfer: NodeTransfer, role: str, stream_interval: int = 1) -> WorkerService:
    """The worker's service over ``engine`` and ``transfer``, its node registered with the
    master (heartbeats started: their load is the service's). If the node cannot start
    (DuplicateNodeId: another live node holds its id, the message names it), the service and
    the node are closed (threads joined, pool unlinked) before the error propagates."""
    service = WorkerService(engine, role, transfer, stream_interval=stream_interval)
    try:
        transfer.start_heartbeats(lambda: _load_of(service))
    except BaseException:
        service.close()
        transfer.close()
        raise
    return service


def _load_of(service: WorkerService) -> WorkerLoad:
    s = service.stats
    return WorkerLoad(s.num_waiting, s.num_running, s.num_free_blocks)


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
