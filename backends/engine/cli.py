"""`triton-pd` subcommands of the engine package (registered by backends/cli.py).

Each `_add_*` function adds one subcommand; add new ones (e.g. a `generate` demo) the same way
and call them from `register`.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the engine's subcommands to the top-level parser's subparsers."""
    _add_export_preset(subparsers)


def _add_export_preset(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export-preset", help="write a preset model as an HF checkpoint directory")
    parser.add_argument("name", help="preset name, e.g. tiny-llama or tiny-mla")
    parser.add_argument("directory", help="output directory (created if missing)")
    parser.set_defaults(func=_export_preset)


def _export_preset(args: argparse.Namespace) -> int:
    from backends.engine.loader import export_preset

    out = export_preset(args.name, args.directory)
    print(f"wrote preset {args.name} to {out}")
    return 0
