"""`triton-pd generate`: prints the engine's text, streamed or not; bad input exits 2."""

from __future__ import annotations

import argparse
import io

from backends.engine import generate_cli
from backends.engine.engine import LLMEngine
from backends.engine.sampling_params import SamplingParams


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="triton-pd")
    generate_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_generate_prints_the_engine_text() -> None:
    engine = LLMEngine("tiny-llama")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = engine.generate([engine.tokenizer.encode("Hello")], params)[0].text
    for extra in ([], ["--stream"]):
        out = io.StringIO()
        args = parse(
            ["generate", "--model", "tiny-llama", "--prompt", "Hello", "--max-tokens", "12",
             "--ignore-eos", *extra]
        )
        assert args.func(args, out=out) == 0
        assert out.getvalue() == expected + "\n"


def test_bad_input_exits_2_with_the_message() -> None:
    err = io.StringIO()
    args = parse(["generate", "--model", "tiny-llama", "--prompt", "Hi", "--max-tokens", "0"])
    assert generate_cli.run(args, out=io.StringIO(), err=err) == 2
    assert err.getvalue() == "error: max_tokens must be > 0, got 0\n"
