"""`triton-pd master`: runs the kvbridge master (loopback by default; a token beyond it)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os

from kvbridge.master.server import MasterConfig, serve_forever


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("master", help="run the kvbridge master (cluster KV index)")
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
