"""``triton-pd demo``: serve the default repository, stream one reply over gRPC, stop.

stdout carries only the reply, printed as the tokens arrive (then a newline); progress goes
to stderr. The server and its stubs are stopped however the demo ends (Ctrl-C, SIGTERM, error).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from backends.serving.client import StreamingClient
from backends.serving.session import default_repository, running_server

DEFAULT_PROMPT = "The capital of France is"


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="serve the default model, stream one reply, stop")
    demo.add_argument("--prompt", default=DEFAULT_PROMPT)
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument("--model", default="llm", help="public model to ask (llm)")
    demo.add_argument("--ready-timeout", type=float, default=600.0)
    demo.set_defaults(func=cmd_demo)


def _note(text: str) -> None:
    print(f"triton-pd demo: {text}", file=sys.stderr, flush=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through running_server's cleanup


def _print_delta(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_demo(args: argparse.Namespace) -> int:
    if args.max_tokens <= 0:
        raise SystemExit(f"--max-tokens must be > 0, got {args.max_tokens}")
    signal.signal(signal.SIGTERM, _terminate)
    with tempfile.TemporaryDirectory(prefix="triton-pd-demo-") as tmp:
        repo = default_repository(Path(tmp))
        _note(f"model repository {repo.path} ({repo.description})")
        with running_server(repo.path, Path(tmp) / "server", args.ready_timeout) as server:
            _note(f"tritonserver pid {server.pid} ready; grpc {server.grpc_url}")
            _note(f"prompt: {args.prompt!r}")
            with StreamingClient(server.grpc_url, args.model) as client:
                result = client.generate(args.prompt, args.max_tokens, on_delta=_print_delta)
            print(flush=True)
            _note(f"{result.num_output_tokens} tokens, finish_reason {result.finish_reason}, "
                  f"TTFT {result.ttft_s * 1e3:.1f} ms, total {result.e2e_s * 1e3:.1f} ms; stopping")
        _note("stopped")
    return 0
