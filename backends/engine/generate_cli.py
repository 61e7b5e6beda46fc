"""`triton-pd generate`: run one prompt through the engine and print the generated text.

    triton-pd generate [--model smollm2-135m-instruct] --prompt "Hello" [--chat] [--stream]

Registered through backends/cli.py (COMMAND_MODULES). Bad input prints `error: ...` to stderr
and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from backends.engine.sources import DEFAULT_MODEL


def register(subparsers: Any) -> None:
    """Add the `generate` subcommand."""
    parser = subparsers.add_parser("generate", help="generate text for one prompt with the engine")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model name, .gguf file or HF checkpoint dir (default: %(default)s)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user turn of the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-tokens", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from backends.engine.engine import LLMEngine
    from backends.engine.engine_config import EngineConfig
    from backends.engine.sampling_params import SamplingParams

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_tokens=args.min_tokens,
            seed=args.seed,
            stop=tuple(args.stop),
            ignore_eos=args.ignore_eos,
        )
        engine = LLMEngine(args.model, EngineConfig(device=args.device))
        prompt = args.prompt
        if args.chat:
            from backends.engine.tokenizer import ChatMessage

            prompt = engine.tokenizer.apply_chat_template([ChatMessage("user", prompt)])
        engine.add_request("cli", engine.tokenizer.encode(prompt), params)
    except ValueError as exc:
        print(f"error: {exc}", file=err)
        return 2
    printed = 0
    text = ""
    while engine.has_unfinished():
        for output in engine.step():
            text = output.text
            if args.stream:
                out.write(text[printed:])
                out.flush()
                printed = len(text)
    out.write(text[printed:] + "\n")
    return 0
