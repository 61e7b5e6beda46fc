"""``triton-pd demo``: serve the default repository, stream one reply over gRPC, stop.

stdout carries only the reply, printed as the tokens arrive (then a newline); progress goes
to stderr, each line with the seconds since the demo started. The prompt is sent as a user turn
of the model's chat template unless --no-chat is given: ``llm`` renders it itself
(``apply_chat_template``); for ``ensemble`` it is rendered here, with the same tokenizer. Before
the server starts, a GGUF model is converted into the cache on the first run
(startup.prepare_sources, gguf_loader.py); each model is reported as it loads.
The server and its stubs are stopped however the demo ends (Ctrl-C, SIGTERM, error).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from backends.launch.client import StreamingClient
from backends.launch.deploy import DEFAULT_MODEL
from backends.launch.session import default_repository, running_server
from backends.launch.startup import StartupError, timed_note

DEFAULT_PROMPT = "What is the capital of France?"
_START = time.monotonic()


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help=f"serve the default model ({DEFAULT_MODEL}, 1 prefill + 1 decode worker "
        "on CPU), stream one reply, stop")
    demo.add_argument("--prompt", default=DEFAULT_PROMPT,
                      help="what to ask (default: %(default)r)")
    demo.add_argument("--no-chat", action="store_true",
                      help="send the prompt as raw text, not as a user turn of the chat template")
    demo.add_argument("--max-tokens", type=int, default=32,
                      help="most tokens to generate (default: %(default)s)")
    demo.add_argument("--model", default="llm",
                      help="public Triton model to ask (default: %(default)s)")
    demo.add_argument("--ready-timeout", type=float, default=600.0,
                      help="seconds to wait for the server to be ready (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)


_note = timed_note("triton-pd demo", _START)


def chat_prompt(source: str, prompt: str) -> str:
    """`prompt` as one user turn of `source`'s chat template (unchanged without a template).
    Loads only the tokenizer; a GGUF model is converted into the cache on first use."""
    from backends.engine.loader import load_tokenizer
    from backends.engine.tokenizer import ChatMessage

    tokenizer = load_tokenizer(source)
    if tokenizer.chat_template is None:
        return prompt
    return tokenizer.apply_chat_template([ChatMessage("user", prompt)])


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through running_server's cleanup


def _print_delta(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_demo(args: argparse.Namespace) -> int:
    if args.max_tokens <= 0:
        raise SystemExit(f"triton-pd demo: --max-tokens must be > 0, got {args.max_tokens}")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _demo(args)
    except (ValueError, OSError, RuntimeError, StartupError) as exc:
        raise SystemExit(f"triton-pd demo: {exc}") from None


def _demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="triton-pd-demo-") as tmp:
        repo = default_repository(Path(tmp))
        _note(f"model repository {repo.path} ({repo.description})")
        with running_server(repo.path, Path(tmp) / "server", args.ready_timeout, _note) as server:
            _note(f"tritonserver pid {server.pid} ready; grpc {server.grpc_url}")
            # llm applies the chat template itself; for ensemble it is rendered here
            server_chat = args.model == "llm" and not args.no_chat
            text = args.prompt if args.no_chat or server_chat else chat_prompt(DEFAULT_MODEL,
                                                                               args.prompt)
            _note(f"prompt: {args.prompt!r}" + (" (as a chat turn)" if not args.no_chat else ""))
            with StreamingClient(server.grpc_url, args.model) as client:
                result = client.generate(text, args.max_tokens, chat=server_chat,
                                         on_delta=_print_delta)
            print(flush=True)
            _note(f"{result.num_output_tokens} tokens, finish_reason {result.finish_reason}, "
                  f"TTFT {result.ttft_s * 1e3:.1f} ms, total {result.e2e_s * 1e3:.1f} ms; stopping")
        _note("stopped")
    return 0
