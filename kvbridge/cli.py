"""`triton-pd master`: runs the kvbridge master (loopback by default; a token beyond it);
`triton-pd master status`: what a running master knows (nodes, their blocks, load, last
heartbeat). With etcd (--etcd or KVBRIDGE_ETCD) the master campaigns for the lead (start two
or more: one leads, the others stand by), and status first prints what etcd says (the
leader, the running masters, the nodes holding a lease), then asks the leader."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os

from kvbridge.errors import KVBridgeError
from kvbridge.etcd import ETCD_ENV, Etcd, EtcdConfig
from kvbridge.master.client import MasterClient
from kvbridge.master.election import live_nodes, running_masters
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
    parser.add_argument("--etcd", default=os.environ.get(ETCD_ENV, ""),
                        help="etcd endpoints host:port[,host:port] for membership and master election "
                             "(default: env KVBRIDGE_ETCD; none: a single master, no election)")
    parser.add_argument("--leader-ttl", type=int, default=5,
                        help="with etcd: seconds after which a dead leader is replaced by a standby")
    parser.add_argument("--advertise", default=None,
                        help="with etcd: the host:port other servers reach this master at "
                             "(default: the bound address; required with --host 0.0.0.0)")
    parser.set_defaults(func=run_master)


def _etcd_config(args: argparse.Namespace, command: str) -> EtcdConfig | None:
    try:
        return EtcdConfig.parse(args.etcd) if args.etcd else None
    except ValueError as exc:
        raise SystemExit(f"{command}: --etcd: {exc}") from None


def run_master(args: argparse.Namespace) -> int:
    if args.action == "status":
        return print_status(args)
    etcd = _etcd_config(args, "triton-pd master")
    try:
        config = MasterConfig(
            host=args.host, port=args.port, token=args.token, heartbeat_timeout_s=args.heartbeat_timeout,
            etcd=etcd, leader_ttl_s=args.leader_ttl, advertise=args.advertise,
        )
    except ValueError as exc:
        raise SystemExit(f"triton-pd master: {exc}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(config))
    return 0


def print_etcd_status(config: EtcdConfig) -> str:
    """Prints etcd's line (leader, masters, node leases); returns the leader's host:port.
    SystemExit with one line when etcd does not answer or no master leads."""
    etcd = Etcd(config, timeout_s=2.0)
    try:
        found = etcd.get(config.leader_key)
        masters, members = running_masters(etcd), live_nodes(etcd)
    except KVBridgeError as exc:
        raise SystemExit(f"triton-pd master status: no answer from etcd {config.describe()}: {exc}") from None
    finally:
        etcd.close()
    leader = None if found is None else found.value
    standby = [m for m in masters if m != leader]
    print(f"etcd {config.describe()}: leader {leader or 'none'}; standby {', '.join(standby) or 'none'}; "
          f"{len(members)} node lease(s)")
    if leader is None:
        raise SystemExit("triton-pd master status: no master leads right now (an election may be under way)")
    return leader


def print_status(args: argparse.Namespace) -> int:
    """One line per node; exit 1 with one line when the master does not answer."""
    etcd = _etcd_config(args, "triton-pd master status")
    address = print_etcd_status(etcd) if etcd is not None else args.address or f"{args.host}:{args.port}"
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"triton-pd master status: --address: expected host:port, got {address!r}")
    try:
        with MasterClient(host, int(port), node_id="status", token=args.token, timeout_s=5.0,
                          etcd=None) as client:
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
