"""The deepep transport's collective, behind a narrow interface, and a CPU implementation of it.

The handles (deepep_handles.py) move a layer with one call of :meth:`Exchange.exchange` per
rank after both ranks agreed on it in the store (deepep_gate.py). Two implementations:

* ``deepep._Dispatcher``: one ``deep_ep.Buffer.dispatch`` on the GPU (what
  ``DeepEPTransport()`` builds; the only code that calls deep_ep or CUDA);
* :class:`GlooExchange`: the same collective semantics over a ``torch.distributed`` gloo group on
  CPU. It exists so that the handles, the worker thread, the store handshake, deadlines, close and
  pins run for real between two processes without GPUs (``DeepEPTransport.with_exchange``); the
  DeepEP dispatch itself is only exercised on GPUs.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from kvbridge.errors import ProtocolError

_META = 3  # per rank: rows sent, destination rank (-1: none), row width in bytes


class Exchange(Protocol):
    """One collective per call: every rank of the group calls it, in the same order.

    ``exchange`` sends ``rows`` (CPU ``[n, hidden]`` bf16, n >= 1, the same ``hidden`` on every
    rank) to group rank ``dest_rank`` (None: nowhere) and returns the rows routed to this rank
    (CPU ``[m, hidden]`` bf16; any order). Called by one thread (the transport's worker).
    ``close`` frees what the exchange owns; the transport calls it once its worker stopped.
    """

    def exchange(self, rows: torch.Tensor, dest_rank: int | None) -> torch.Tensor: ...

    def close(self) -> None: ...


class GlooExchange:
    """:class:`Exchange` over a gloo ``torch.distributed`` group (CPU; a test seam, see module doc).

    Per call, two real collectives on ``group`` (None: the default group): an ``all_gather`` of
    each rank's (rows sent, destination, row width), then an ``all_to_all_single`` of the rows'
    bytes with the split sizes that implies. Ranks that disagree on the row width all raise the
    same ProtocolError after the first collective (none enters the second), so the group's
    collectives stay matched. A collective that outlives the group's timeout raises gloo's
    RuntimeError. Does not own ``group``: ``close`` only refuses later calls.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: GlooExchange needs an initialised torch.distributed process group")
        backend = str(dist.get_backend(group))
        if backend != "gloo":
            raise ValueError(f"group: GlooExchange needs a gloo group, got backend {backend!r}")
        self._group = group
        self.rank = int(dist.get_rank(group))
        self.world_size = int(dist.get_world_size(group))
        self._closed = False

    def exchange(self, rows: torch.Tensor, dest_rank: int | None) -> torch.Tensor:
        import torch.distributed as dist

        if self._closed:
            raise RuntimeError("GlooExchange is closed")
        if rows.dtype != torch.bfloat16 or rows.dim() != 2 or rows.shape[0] < 1:
            raise ValueError(f"rows: expected a CPU [n >= 1, hidden] bf16 tensor, got {rows.dtype} {tuple(rows.shape)}")
        if dest_rank is not None and not 0 <= dest_rank < self.world_size:
            raise ValueError(f"dest_rank: expected a rank in [0, {self.world_size}), got {dest_rank}")
        data = rows.contiguous().view(torch.uint8)  # gloo's all_to_all refuses some dtypes; bytes travel as-is
        num_sent = 0 if dest_rank is None else int(data.shape[0])
        width = int(data.shape[1])
        mine = torch.tensor([num_sent, -1 if dest_rank is None else dest_rank, width], dtype=torch.int64)
        metas = [torch.empty(_META, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(metas, mine, group=self._group)
        widths = sorted({int(meta[2]) for meta in metas})
        if len(widths) != 1:
            raise ProtocolError(f"deepep exchange: ranks passed rows of {widths} bytes; every rank must pass the same width")
        in_splits = [num_sent if rank == dest_rank else 0 for rank in range(self.world_size)]
        out_splits = [int(meta[0]) if int(meta[1]) == self.rank else 0 for meta in metas]
        out = torch.empty((sum(out_splits), width), dtype=torch.uint8)
        dist.all_to_all_single(out, data[:num_sent], out_splits, in_splits, group=self._group)
        return out.view(torch.bfloat16)

    def close(self) -> None:
        self._closed = True
