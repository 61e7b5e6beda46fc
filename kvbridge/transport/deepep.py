"""DeepEP transport: layer-wise KV transfers as DeepEP dispatches between two GPU ranks.

DeepEP (deepseek-ai/DeepEP) is an all-to-all for MoE tokens over NVLink (intranode) and
NVSHMEM/RDMA (internode). Its public Python API, as used here (``deep_ep/buffer.py``):

* ``deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, ...)``: communication buffers over a
  ``torch.distributed`` group; constructing one all-gathers device ids and IPC handles over the
  group, so every rank of the group constructs it (here: constructs the transport) together.
  The NVLink size comes from ``Buffer.get_dispatch_config(num_ranks)`` and that Config's
  ``get_nvl_buffer_size_hint(hidden_bytes, num_ranks)``. DeepEP counts ranks in nodes of 8
  (``csrc/deep_ep.cpp``, ``Buffer::Buffer``: ``num_rdma_ranks = max(1, num_ranks / 8)``, and
  RDMA bytes only with more than 8 ranks), so a two-rank group is one NVLink domain: this
  transport moves KV between two GPUs of one node, with no RDMA buffer. Newer releases take
  ``explicitly_destroy=True`` and then need ``destroy()``; we pass it when the signature has it.
* ``Buffer.get_dispatch_layout(topk_idx, num_experts)`` -> per-rank / per-RDMA-rank /
  per-expert token counts and ``is_token_in_rank``, which ``Buffer.dispatch(x, ...)`` takes along
  with ``topk_idx`` / ``topk_weights``; dispatch returns ``(recv_x, recv_topk_idx,
  recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``. ``x`` is ``[num_tokens,
  hidden]`` bf16. A dispatch is a collective: every rank of the group calls it, in the same order.

How a KV layer rides on that (the pure part, tested on CPU: deepep_rows.py): the layer's bytes
become bf16 rows tagged with their index, layer and transfer, routed with one expert per rank to
the consumer; the consumer passes one unrouted row, receives the producer's rows, and places them
by their tags. Host runs are staged to the GPU and back (``.to(device)`` / ``.cpu()``).

Protocol: one dispatch per layer, in order; both ranks first agree in a torch.distributed Store
(deepep_gate.py says why: an early rank spins in DeepEP with the GIL held), so a side that gives
up (close, deadline) ends the transfer on both sides without unmatched collectives. One worker
thread per transport runs the transfers one at a time, in start order; both ranks must start
matching transfers in the same order (a mismatch times out at the caller's deadlines; it never
enters a dispatch alone). The group must be exactly the two ranks (producer and consumer), e.g.
``torch.distributed.new_group([p, c])``; the caller sets the CUDA device before constructing.

``TransferSpec.endpoint`` is ``"deepep:<producer rank>:<consumer rank>"`` (ranks in the group;
:meth:`DeepEPTransport.spec_for` builds it); each side checks it names itself. ``transfer_id``
must be non-empty (it keys the store and the rows' tags). A send handle's ``poll`` counts layers
whose dispatch completed on the producer. Limits: a transfer is not faster than a host copy to
and from the GPU; a peer that dies inside a dispatch leaves our worker there until DeepEP's own
CPU timeout, and ``close()`` then gives up on the worker after CLOSE_WAIT_S.

The collective sits behind :class:`~kvbridge.transport.deepep_exchange.Exchange`: ``DeepEPTransport()``
always builds the DeepEP one (``_Dispatcher``); :meth:`DeepEPTransport.with_exchange` takes
another, e.g. ``GlooExchange`` over a gloo group, so that everything but the dispatch (handles,
worker, handshake, deadlines, close, pins) runs between CPU processes in tests. The DeepEP
dispatch itself is only exercised on GPUs.

Requirements, checked at construction, TransportUnavailable naming what is missing: the
``deep_ep`` package, CUDA, and a process group (``group=`` or an initialised default group).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import queue
import threading
from typing import Any

import torch

from kvbridge.errors import KVBridgeError, RemoteError, TransportUnavailable
from kvbridge.slots import SlotAllocator
from kvbridge.transport.base import LayerBuffers, TransferSpec, Transport
from kvbridge.transport.deepep_exchange import Exchange, GlooExchange
from kvbridge.transport.deepep_handles import DeepEPRecvHandle, DeepEPSendHandle
from kvbridge.transport.deepep_rows import (
    MAX_ROW_BYTES,
    TAG_BYTES,
    RowLayout,
    format_endpoint,
    parse_endpoint,
    routing,
)

__all__ = ["DeepEPRecvHandle", "DeepEPSendHandle", "DeepEPTransport", "Exchange", "GlooExchange",
           "deepep_available", "missing_requirement"]

CLOSE_WAIT_S = 5.0
_Job = DeepEPSendHandle | DeepEPRecvHandle


def deepep_available() -> bool:
    return importlib.util.find_spec("deep_ep") is not None


def missing_requirement(*, deep_ep_found: bool, cuda_available: bool, group_given: bool,
                        dist_initialized: bool) -> str | None:
    """The TransportUnavailable message for the first missing requirement, None when all hold."""
    if not deep_ep_found:
        return "transport 'deepep' needs the 'deep_ep' package (DeepEP, built against NVSHMEM), not installed"
    if not cuda_available:
        return "transport 'deepep' needs CUDA (DeepEP runs on NVIDIA GPUs); torch.cuda.is_available() is False"
    if not (group_given or dist_initialized):
        return ("transport 'deepep' needs a torch.distributed process group: pass group=, "
                "or call torch.distributed.init_process_group() first")
    return None


class _Dispatcher:
    """The only code that calls deep_ep or CUDA: one ``deep_ep.Buffer`` and one dispatch per call.

    The default :class:`Exchange` (see deepep_exchange.py for the contract).
    """

    def __init__(self, deep_ep: Any, group: Any, max_row_bytes: int) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.world_size = int(group.size())
        hidden_bytes = max_row_bytes + TAG_BYTES
        config = deep_ep.Buffer.get_dispatch_config(self.world_size)
        num_nvl_bytes = config.get_nvl_buffer_size_hint(hidden_bytes, self.world_size)
        num_rdma_bytes = 0  # two ranks are one NVLink domain; DeepEP refuses RDMA bytes there
        explicit = "explicitly_destroy" in inspect.signature(deep_ep.Buffer).parameters
        extra = {"explicitly_destroy": True} if explicit else {}
        self._buffer: Any = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, **extra)
        self._explicit = explicit
        self._idx_dtype = getattr(deep_ep, "topk_idx_t", torch.int64)

    def exchange(self, rows: torch.Tensor, dest_rank: int | None) -> torch.Tensor:
        torch.cuda.set_device(self.device)  # the worker thread's current device (cheap when already set)
        topk_idx, topk_weights = routing(int(rows.shape[0]), dest_rank, self.world_size)
        x = rows.to(self.device)
        idx = topk_idx.to(self.device, self._idx_dtype)
        weights = topk_weights.to(self.device)
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self._buffer.get_dispatch_layout(idx, self.world_size)
        recv_x = self._buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx, topk_weights=weights)[0]
        received: torch.Tensor = recv_x.cpu()
        return received

    def close(self) -> None:
        buffer, self._buffer = self._buffer, None
        if buffer is not None and self._explicit:
            buffer.destroy()


def _two_rank_group(group: Any) -> Any:
    """``group`` (None: the default group); ValueError unless it holds exactly two ranks."""
    import torch.distributed as dist

    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("group: deepep needs a torch.distributed process group: pass group=, "
                             "or call torch.distributed.init_process_group() first")
        group = dist.group.WORLD
    if group.size() != 2:
        raise ValueError(f"group: deepep transfers run between exactly two ranks, the group has {group.size()}")
    return group


def _import_deep_ep(group: Any) -> Any:
    """``deep_ep``, once every requirement holds; TransportUnavailable naming the first missing."""
    import torch.distributed as dist

    message = missing_requirement(
        deep_ep_found=deepep_available(), cuda_available=torch.cuda.is_available(),
        group_given=group is not None, dist_initialized=dist.is_available() and dist.is_initialized())
    if message is not None:
        raise TransportUnavailable(message)
    try:
        return importlib.import_module("deep_ep")
    except ImportError as exc:
        raise TransportUnavailable(f"transport 'deepep': 'deep_ep' is installed but does not import: {exc}") from exc


class DeepEPTransport(Transport):
    """Layer-wise transfers between the two ranks of ``group`` over DeepEP (see the module doc).

    ``store``: a torch.distributed Store both ranks reach (default: the default group's store).
    ``max_row_bytes``: the largest row (a multiple of 16, at most MAX_ROW_BYTES); both ranks must
    pass the same value. Owns one deep_ep.Buffer (its :class:`Exchange`) and one worker thread
    until ``close()``. :meth:`with_exchange` builds one over another Exchange (a CPU test seam).
    """

    name = "deepep"
    package = "deep_ep"

    @classmethod
    def available(cls) -> bool:
        return deepep_available()

    def __init__(self, group: Any = None, *, store: Any = None, max_row_bytes: int = MAX_ROW_BYTES) -> None:
        RowLayout.for_layer(1, max_row_bytes)
        deep_ep = _import_deep_ep(group)
        group = _two_rank_group(group)
        self._start(group, store, max_row_bytes, _Dispatcher(deep_ep, group, max_row_bytes))

    @classmethod
    def with_exchange(cls, exchange: Exchange, group: Any = None, *, store: Any = None,
                      max_row_bytes: int = MAX_ROW_BYTES) -> DeepEPTransport:
        """A transport whose layers move through ``exchange`` instead of a DeepEP dispatch.

        A test seam of the protocol: with a :class:`~kvbridge.transport.deepep_exchange.GlooExchange`
        on a gloo group, the handles, the worker thread, the store handshake, deadlines, close and
        pins run between CPU processes without GPUs; the DeepEP dispatch itself (``_Dispatcher``,
        what ``DeepEPTransport()`` builds) is only exercised on GPUs. ``group`` (None: the default
        group) gives this rank and must hold exactly two ranks; ``exchange`` must run its
        collectives over the same ranks. The transport owns ``exchange`` and closes it in
        ``close()``. Needs neither deep_ep nor CUDA.
        """
        RowLayout.for_layer(1, max_row_bytes)
        transport = cls.__new__(cls)
        transport._start(_two_rank_group(group), store, max_row_bytes, exchange)
        return transport

    def _start(self, group: Any, store: Any, max_row_bytes: int, exchange: Exchange) -> None:
        import torch.distributed as dist

        self.rank = int(group.rank())
        self._store = store if store is not None else dist.distributed_c10d._get_default_store()
        self._max_row_bytes = max_row_bytes
        self._exchange = exchange
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live: set[_Job] = set()
        self._broken: str | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._run, name=f"deepep-rank{self.rank}", daemon=True)
        self._worker.start()

    @property
    def peer_rank(self) -> int:
        return 1 - self.rank

    def spec_for(self, transfer_id: str, num_layers: int, layer_nbytes: int,
                 source_slots: tuple[int, ...] = ()) -> TransferSpec:
        """A spec for a transfer from this rank to its peer (what the consumer's start_recv takes)."""
        return TransferSpec(transfer_id, num_layers, layer_nbytes, endpoint=format_endpoint(self.rank, self.peer_rank),
                            source_slots=source_slots)

    def _check_spec(self, spec: TransferSpec, producer_side: bool) -> int:
        """The peer's rank; ValueError unless ``spec`` names this rank on the right side."""
        if not spec.transfer_id:
            raise ValueError("spec.transfer_id: deepep needs a transfer id (pulls by handle are not supported)")
        producer, consumer = parse_endpoint(spec.endpoint, 2)
        mine, peer, side = (producer, consumer, "producer") if producer_side else (consumer, producer, "consumer")
        if mine != self.rank:
            raise ValueError(f"endpoint: {spec.endpoint!r} names rank {mine} as the {side}; this transport is rank {self.rank}")
        return peer

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._closed or self._broken is not None:
                job.close()
                if self._closed:
                    raise RuntimeError("deepep transport is closed")
                raise TransportUnavailable(self._broken or "")
            self._live.add(job)
        self._queue.put(job)

    def start_send(self, spec: TransferSpec, source: LayerBuffers, pins: SlotAllocator | None = None) -> DeepEPSendHandle:
        dest_rank = self._check_spec(spec, producer_side=True)
        spec.check_buffers(source, "source")
        handle = DeepEPSendHandle(spec, source, self._store, self._max_row_bytes, dest_rank, pins)
        self._submit(handle)
        return handle

    def start_recv(self, spec: TransferSpec, dest: LayerBuffers) -> DeepEPRecvHandle:
        self._check_spec(spec, producer_side=False)
        spec.check_buffers(dest, "dest")
        handle = DeepEPRecvHandle(spec, dest, self._store, self._max_row_bytes)
        self._submit(handle)
        return handle

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                if self._broken is not None:
                    raise TransportUnavailable(self._broken)
                job.run(self._exchange)
            except KVBridgeError as exc:  # the peer gave up or sent bad rows: collectives still matched
                job.fail(exc)
            except Exception as exc:  # the collective failed (deep_ep, CUDA, gloo): nothing is matched any more
                self._broken = f"transport 'deepep' is unusable after a failed dispatch: {type(exc).__name__}: {exc}"
                job.fail(RemoteError("transfer", f"deepep transfer {job.spec.transfer_id}: {exc}"))
            finally:
                with self._lock:
                    self._live.discard(job)

    def close(self) -> None:
        """Closes every live handle (aborting unfinished transfers), stops the worker, frees the buffer.

        Idempotent. A worker still inside a dispatch after CLOSE_WAIT_S (its peer died) is left
        behind, and the DeepEP buffer with it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = list(self._live)
        for job in live:
            job.close()
        self._queue.put(None)
        self._worker.join(CLOSE_WAIT_S)
        if not self._worker.is_alive():
            self._exchange.close()
