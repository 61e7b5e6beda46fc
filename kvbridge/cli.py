"""`triton-pd master`: runs the kvbridge master (loopback by default; a token beyond it);
`triton-pd master status`: what a running master knows (nodes, their blocks, load, last
heartbeat)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os

from kvbridge.errors import KVBridgeError
from kvbridge.master.client import MasterClient
from kvbridge.master.server import MasterConfig, serve_forever


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("master", help="run the kvbridge master (cluster KV index), "
                                   "or show a running one's nodes (master status)")
    parser.add_argument("action", nargs="?", choices=["run", "status"], default="run",
                        help="run a master (default), or print a running master's nodes and index")
    parser.add_argument("--address", default=os.environ.get("KVBRIDGE_MASTER", ""),
                        help="status: the master's host:port (default: env KVBRIDGE_MASTER, "
                             "else --host and --port)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=7070)
    parser.add_argument(
        "--token", default=os.environ.get("KVBRIDGE_TOKEN"),
        help="shared secret clients must present (required beyond loopback; env KVBRIDGE_TOKEN)",
    )
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0,
                        help="seconds without a heartbeat before a node and its blocks are dropped")
    parser.set_defaults(func=run_master)


def run_master(args: argparse.Namespace) -> int:
    if args.action == "status":
        return print_status(args)
    try:
        config = MasterConfig(
            host=args.host, port=args.port, token=args.token, heartbeat_timeout_s=args.heartbeat_timeout
        )
    except ValueError as exc:
        raise SystemExit(f"triton-pd master: {exc}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(config))
    return 0


def print_status(args: argparse.Namespace) -> int:
    """One line per node; exit 1 with one line when the master does not answer."""
    address = args.address or f"{args.host}:{args.port}"
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"triton-pd master status: --address: expected host:port, got {address!r}")
    try:
        with MasterClient(host, int(port), node_id="status", token=args.token, timeout_s=5.0) as client:
            nodes = client.nodes()
    except (KVBridgeError, OSError) as exc:
        raise SystemExit(f"triton-pd master status: no answer from {address}: {exc}") from None
    print(f"master {address}: {len(nodes)} node(s), {sum(n.num_blocks for n in nodes)} block entries")
    print(f"{'node':48s} {'endpoint':22s} {'blocks':>7s} {'running':>7s} {'queued':>6s} "
          f"{'free':>6s} {'heard':>7s}")
    for n in nodes:
        print(f"{n.node_id:48s} {n.endpoint:22s} {n.num_blocks:7d} {n.load.num_running:7d} "
              f"{n.load.queue_len:6d} {n.load.num_free_blocks:6d} {n.seconds_since_heartbeat:6.1f}s")
    return 0
