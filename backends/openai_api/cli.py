"""``triton-pd openai``: the OpenAI-compatible front door for a running tritonserver."""

from __future__ import annotations

import argparse
import sys
import time

from backends.openai_api.server import FrontDoorConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    door = subparsers.add_parser(
        "openai", help="serve the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions) "
        "in front of a running tritonserver", description="Serve the OpenAI API over HTTP, "
        "forwarding each request to tritonserver's llm model over gRPC streaming, until Ctrl-C. "
        "(triton-pd serve --openai-port N starts the same beside its tritonserver.)")
    door.add_argument("--grpc-url", default="127.0.0.1:8001",
                      help="tritonserver's gRPC endpoint (default: %(default)s)")
    door.add_argument("--model", default="llm",
                      help="the Triton model to forward to, with llm's tensors; it is also the "
                      "OpenAI model id (default: %(default)s)")
    door.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    door.add_argument("--port", type=int, default=9000, help="HTTP port (default: %(default)s)")
    door.add_argument("--connect-timeout", type=float, default=60.0,
                      help="seconds to wait for the model to be ready (default: %(default)s)")
    door.add_argument("--request-timeout", type=float, default=600.0,
                      help="deadline of one request, in seconds (default: %(default)s)")
    door.set_defaults(func=cmd_openai)


def cmd_openai(args: argparse.Namespace) -> int:
    from backends.openai_api.server import run

    start = time.monotonic()

    def note(line: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] triton-pd openai: {line}; Ctrl-C stops",
              file=sys.stderr, flush=True)

    config = FrontDoorConfig(args.grpc_url, args.model, args.host, args.port,
                             args.connect_timeout, args.request_timeout)
    try:
        run(config, note)
    except (ValueError, ConnectionError, OSError) as exc:
        raise SystemExit(f"triton-pd openai: {exc}") from None
    except KeyboardInterrupt:
        pass
    return 0
