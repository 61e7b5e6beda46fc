"""The JSON file a benchmark script writes beside its table (``--json FILE``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any


def write_rows(path: str | None, args: argparse.Namespace, rows: Sequence[Any]) -> None:
    """``{"config": the arguments but --json, "rows": each row (a dataclass) as a dict}`` to
    ``path``; nothing when ``path`` is None."""
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"config": {k: v for k, v in vars(args).items() if k != "json"},
                   "rows": [asdict(r) for r in rows]}, f, indent=2)
