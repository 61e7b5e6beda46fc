"""The master's asyncio server: one task per connection, one reaper task, one ClusterIndex.

Connection contract: the first frame is a Hello with the token (when the server has one);
then any number of request frames, each answered by exactly one reply frame. A request the
index rejects (unknown node, bad value) gets ``ErrorReply`` and the connection stays open; a
bad frame (malformed, oversized, wrong version) or failed authentication gets ``ErrorReply``
and the connection is closed. Neither affects other connections.
Nodes silent for ``heartbeat_timeout_s`` are dropped with all their entries by the reaper.
With etcd (``config.etcd``), several masters run and one leads (election.py): a standing-by
master answers every request with ``ErrorReply(NOT_LEADER)`` (clients then ask etcd who leads);
the leader admits a RegisterNode only from a node holding its key in etcd at that endpoint,
and drops a node (with its entries) once its etcd lease has gone. A master that comes to lead
starts with an empty index: nodes register again and re-publish what they hold. Etcd calls run
on the server's own etcd thread, each bounded by the etcd client's deadline.
Limits: at most ``max_connections`` connections (a further one is closed at once); the Hello
frame may announce at most ``HELLO_MAX_FRAME_BYTES``; batch inserts and removes are applied in
slices of ``INDEX_SLICE`` hashes with the loop free in between, so heartbeats and lookups on
other connections are answered while a huge batch is indexed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from kvbridge.auth import HelloAck, check_bind, check_hello
from kvbridge.errors import AuthError, KVBridgeError, PeerClosed, ProtocolError
from kvbridge.etcd import Etcd, EtcdConfig
from kvbridge.master.election import NOT_LEADER, Election, Role
from kvbridge.master.index import UNKNOWN_NODE, ClusterIndex, UnknownNode
from kvbridge.master.messages import (
    Heartbeat,
    InsertBlocks,
    ListNodes,
    Lookup,
    LookupReply,
    NodesReply,
    RegisterNode,
    RemoveBlocks,
)
from kvbridge.membership import DuplicateNodeId
from kvbridge.protocol import DEFAULT_MAX_FRAME_BYTES, ErrorReply, Ok, read_message, write_message

log = logging.getLogger(__name__)
HELLO_MAX_FRAME_BYTES = 4096
INDEX_SLICE = 4096
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MasterConfig:
    host: str = "127.0.0.1"
    port: int = 0                    # 0: any free port (see MasterServer.address)
    token: str | None = None
    heartbeat_timeout_s: float = 10.0
    auth_timeout_s: float = 5.0
    idle_timeout_s: float = 600.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_connections: int = 256
    etcd: EtcdConfig | None = None   # None: the only master, no election
    leader_ttl_s: int = 5            # with etcd: a dead leader is replaced after about this long
    advertise: str | None = None     # with etcd: the "host:port" clients reach (default: bound one)

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections: expected >= 1, got {self.max_connections}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: expected 0..65535, got {self.port}")
        if self.heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s: expected > 0, got {self.heartbeat_timeout_s}")
        if self.leader_ttl_s < 2:
            raise ValueError(f"leader_ttl_s: expected >= 2 (etcd's shortest lease), got {self.leader_ttl_s}")
        if self.etcd is not None and self.advertise is None and self.host in ("0.0.0.0", "::", ""):
            raise ValueError(f"advertise: required with etcd when binding {self.host!r} (the host:port "
                             "other servers reach this master at)")
        check_bind(self.host, self.token)


class MasterServer:
    """Owns the listening socket, the reaper task and the index; ``close()`` stops all three."""

    def __init__(self, config: MasterConfig) -> None:
        self.config = config
        self.index = ClusterIndex()
        self._server: asyncio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.role = Role(config.etcd is None, None)
        self._election: Election | None = None
        self._campaign: asyncio.Task[None] | None = None
        self._etcd_thread: ThreadPoolExecutor | None = None
        self._registered_at: dict[str, float] = {}  # node id -> when it last registered

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("master server is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, self.config.host, self.config.port)
        self._reaper = asyncio.create_task(self._reap_forever())
        log.info("kvbridge master listening on %s:%d", *self.address)
        if self.config.etcd is not None:
            host, port = self.address
            self._etcd_thread = ThreadPoolExecutor(1, thread_name_prefix="kvbridge-master-etcd")
            self._election = Election(Etcd(self.config.etcd), self.config.advertise or f"{host}:{port}",
                                      self.config.leader_ttl_s)
            log.info("kvbridge master %s campaigns in etcd %s (leader ttl %d s)", self._election.address,
                     self.config.etcd.describe(), self.config.leader_ttl_s)
            self._campaign = asyncio.create_task(self._campaign_forever(self._election))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in (self._reaper, self._campaign, *self._conns) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._election is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await self._in_etcd(self._election.resign)  # a standby takes over at once
            self._election.etcd.close()
        if self._etcd_thread is not None:
            self._etcd_thread.shutdown(wait=False)
        if self._server is not None:
            await self._server.wait_closed()

    async def _in_etcd(self, call: Callable[[], T]) -> T:
        """Runs a blocking etcd call on the etcd thread; each HTTP request in it has the etcd
        client's deadline, and the whole call a bound of a few of them."""
        if self._election is None or self._etcd_thread is None:
            raise RuntimeError("this master runs without etcd")
        config = self._election.etcd.config
        bound = 4 * config.timeout_s * len(config.endpoints) + 1.0
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._etcd_thread, call), bound)

    async def _campaign_forever(self, election: Election) -> None:
        period = max(0.2, election.ttl_s / 3)
        while True:
            started = time.monotonic()
            members: dict[str, str] | None = None
            try:
                role = await self._in_etcd(election.step)
                if role.leading:
                    members = await self._in_etcd(election.members)
            except (KVBridgeError, asyncio.TimeoutError) as exc:
                # without etcd, lead on only while the lease may still be alive
                leading = self.role.leading and election.lease_alive(time.monotonic())
                role = Role(leading, self.role.leader if leading else None)
                log.warning("kvbridge master %s: etcd did not answer (%s)%s", election.address, exc,
                            "" if role.leading or not self.role.leading else "; standing down")
            self._set_role(role, election.address)
            if members is not None:
                self._drop_departed(members, started)
            await asyncio.sleep(period)

    def _set_role(self, role: Role, address: str) -> None:
        """Takes ``role``; the index starts empty whenever this master comes to lead or stops."""
        before, self.role = self.role, role
        if role.leading != before.leading:
            self.index = ClusterIndex()
            self._registered_at.clear()
        if role.leading and not before.leading:
            log.info("kvbridge master %s leads (nodes register again and re-publish their blocks)", address)
        elif not role.leading and (before.leading or role.leader != before.leader):
            log.info("kvbridge master %s stands by; the leader is %s", address, role.leader or "unknown")

    def _drop_departed(self, members: dict[str, str], since: float) -> None:
        """Drops the nodes, registered before ``since``, whose etcd key is gone (lease expired
        or revoked) or now names another endpoint."""
        for info in self.index.nodes(time.monotonic()):
            node = info.node_id
            if members.get(node) == info.endpoint or self._registered_at.get(node, float("-inf")) >= since:
                continue
            self.index.drop(node)
            self._registered_at.pop(node, None)
            log.info("kvbridge master: node %s left etcd (its lease expired or was revoked); dropped "
                     "it and its %d block entries", node, info.num_blocks)

    async def _check_member(self, request: RegisterNode) -> ErrorReply | None:
        """With etcd: None when the node holds its key at its endpoint, else why not."""
        election = self._election
        if election is None:
            return None
        key = election.etcd.config.node_key(request.node_id)
        try:
            found = await self._in_etcd(lambda: election.etcd.get(key))
        except (KVBridgeError, asyncio.TimeoutError) as exc:
            return ErrorReply("etcd_unavailable", f"cannot check node {request.node_id!r} in etcd: {exc}")
        if found is None:
            return ErrorReply("not_member", f"node_id: {request.node_id!r} holds no key in etcd ({key}); "
                              "a node joins etcd before it registers (set KVBRIDGE_ETCD for it too)")
        if found.value != request.endpoint:
            return ErrorReply("invalid", str(DuplicateNodeId(request.node_id, found.value, request.endpoint, key)))
        return None

    async def _reap_forever(self) -> None:
        period = min(0.5, self.config.heartbeat_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            dropped = self.index.expire(time.monotonic(), self.config.heartbeat_timeout_s)
            for node in dropped:
                self._registered_at.pop(node, None)
            if dropped:
                log.warning("kvbridge master dropped silent nodes %s", dropped)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= self.config.max_connections:
            log.warning("kvbridge master: %d connections open, refusing one", len(self._conns))
            writer.close()
            return
        if task is not None:
            self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except PeerClosed:
            log.info("kvbridge master: a peer disconnected")
        except (ProtocolError, AuthError) as exc:
            code = "auth" if isinstance(exc, AuthError) else "protocol"
            log.info("kvbridge master closing connection: %s", exc)
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await write_message(writer, ErrorReply(code, str(exc)), self.config.auth_timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("kvbridge master connection ended: %r", exc)
        except asyncio.CancelledError:
            pass  # server shutdown; this is the connection's top-level task
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self.config
        hello = await asyncio.wait_for(
            read_message(reader, cfg.auth_timeout_s, min(HELLO_MAX_FRAME_BYTES, cfg.max_frame_bytes)),
            cfg.auth_timeout_s)
        check_hello(hello, cfg.token)
        await write_message(writer, HelloAck("kvbridge-master"), cfg.auth_timeout_s)
        while True:
            request = await read_message(reader, cfg.idle_timeout_s, cfg.max_frame_bytes)
            await write_message(writer, await self._handle(request), cfg.idle_timeout_s)

    async def _handle(self, request: object) -> object:
        """Applies one request to the index; a rejected request is an ErrorReply, not a raise."""
        if not self.role.leading:
            address = self._election.address if self._election is not None else "?"
            return ErrorReply(NOT_LEADER, f"master {address} stands by; the leader is "
                                          f"{self.role.leader or 'unknown'}")
        now = time.monotonic()
        index = self.index
        try:
            if isinstance(request, Lookup):
                return LookupReply(index.lookup(request.block_hashes))
            if isinstance(request, (InsertBlocks, RemoveBlocks)):
                apply = index.insert if isinstance(request, InsertBlocks) else index.remove
                hashes = request.block_hashes
                for start in range(0, max(len(hashes), 1), INDEX_SLICE):
                    apply(request.node_id, request.tier, hashes[start:start + INDEX_SLICE])
                    if start + INDEX_SLICE < len(hashes):
                        await asyncio.sleep(0)
            elif isinstance(request, Heartbeat):
                index.heartbeat(request.node_id, request.load, now)
            elif isinstance(request, RegisterNode):
                refused = await self._check_member(request)
                if refused is not None:
                    return refused
                if index is not self.index or not self.role.leading:
                    return ErrorReply(NOT_LEADER, "this master's term ended while it checked the node")
                self._registered_at[request.node_id] = now
                known = {n.node_id: n.num_blocks for n in index.nodes(now)}
                if index.register(request.node_id, request.endpoint, request.load, now,
                                  self.config.heartbeat_timeout_s):
                    log.info("kvbridge master: node %s joined at %s", request.node_id, request.endpoint)
                else:
                    log.info("kvbridge master: node %s registered again at %s (%d blocks kept)",
                             request.node_id, request.endpoint, known.get(request.node_id, 0))
            elif isinstance(request, ListNodes):
                return NodesReply(index.nodes(now))
            else:
                raise ProtocolError(f"unexpected request {type(request).__name__}")
        except UnknownNode as exc:
            return ErrorReply(UNKNOWN_NODE, str(exc))
        except ValueError as exc:
            return ErrorReply("invalid", str(exc))
        return Ok()


class MasterThread:
    """Runs a MasterServer on its own event loop in a background thread (tests, `serve`)."""

    def __init__(self, config: MasterConfig, start_timeout_s: float = 10.0) -> None:
        self.server = MasterServer(config)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvbridge-master", daemon=True)
        self._thread.start()
        if not self._started.wait(start_timeout_s):
            raise RuntimeError(f"kvbridge master did not start within {start_timeout_s}s")
        if self._error is not None:
            raise self._error

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to the constructor's caller
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.close())
        self._loop.close()

    def close(self, timeout_s: float = 10.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    def __enter__(self) -> MasterThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def serve_forever(config: MasterConfig) -> None:
    """Runs a master until cancelled (the CLI's entry point)."""
    server = MasterServer(config)
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()
