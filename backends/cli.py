"""The `triton-pd` command: one subcommand module per package.

Each module in COMMAND_MODULES exposes ``register(subparsers)``, which adds its subcommands
and sets ``func`` (taking the parsed namespace, returning an exit code) on each parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "backends.engine.cli",
    "backends.engine.generate_cli",
    "kvbridge.cli",
    "backends.launch.cli",
    "backends.openai_api.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triton-pd", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
