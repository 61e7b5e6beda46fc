"""Workers and orchestrators meeting the kvbridge master.

- ``master_address()``: the master's "host:port" from ``KVBRIDGE_MASTER`` (None: no master);
  ``KVBRIDGE_TOKEN`` is its token. ``start_master_if_needed()`` runs one in-process (loopback,
  free port) and exports KVBRIDGE_MASTER for children unless one is configured.
- Node ids are unique in the cluster: ``worker_node_id(model)`` is ``<server>/<model>#<pid>``,
  ``<server>`` being ``TRITON_PD_SERVER_ID`` or, by default, this host's name and the process
  group of its tritonserver (the stubs and the orchestrator share it), ``<pid>`` the worker
  stub's (a reloaded worker is a new node: it never inherits its predecessor's entries).
  ``local_model(node_id)`` maps a node of this server back to its model name.
- ``connect(node_id)``: a MasterClient for the orchestrator's cluster view. A worker's node
  talks to the master itself (kvbridge's KVNode, given ``master_address()`` and the token);
  a missing or failing master is logged and ignored: serving degrades to no cluster index.
"""

from __future__ import annotations

import os
import socket

from kvbridge import MasterClient, MasterConfig, MasterThread

MASTER_ENV = "KVBRIDGE_MASTER"
TOKEN_ENV = "KVBRIDGE_TOKEN"
CLIENT_TIMEOUT_S = 2.0


SERVER_ENV = "TRITON_PD_SERVER_ID"


def server_id() -> str:
    return os.environ.get(SERVER_ENV) or f"{socket.gethostname()}-{os.getpgrp()}"


def worker_node_id(model_name: str) -> str:
    return f"{server_id()}/{model_name}#{os.getpid()}"


def local_model(node_id: str) -> str | None:
    """The model name of ``node_id`` when it is a worker of this server, else None."""
    server, sep, rest = node_id.partition("/")
    if not sep or server != server_id():
        return None
    return rest.rpartition("#")[0] or None


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` → (host, port); ValueError naming KVBRIDGE_MASTER otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{MASTER_ENV}: expected 'host:port', got {value!r}")
    return host, int(port)


def master_address() -> tuple[str, int] | None:
    value = os.environ.get(MASTER_ENV, "")
    return parse_address(value) if value else None


def start_master_if_needed(heartbeat_timeout_s: float = 10.0) -> MasterThread | None:
    """Starts a loopback master (and sets KVBRIDGE_MASTER) unless one is configured; the
    caller closes the returned thread."""
    if master_address() is not None:
        return None
    master = MasterThread(MasterConfig(heartbeat_timeout_s=heartbeat_timeout_s))
    host, port = master.address
    os.environ[MASTER_ENV] = f"{host}:{port}"
    return master


def master_token() -> str | None:
    return os.environ.get(TOKEN_ENV)


def connect(node_id: str, timeout_s: float = CLIENT_TIMEOUT_S) -> MasterClient | None:
    address = master_address()
    if address is None:
        return None
    return MasterClient(*address, node_id=node_id, token=master_token(), timeout_s=timeout_s)
