"""backends/launch/bench_json.py: what a benchmark's --json FILE holds."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from backends.launch.bench_json import write_rows


@dataclass
class Row:
    mode: str
    tok_s: float


def test_write_rows(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    args = argparse.Namespace(json=str(path), concurrency=[1, 32], model="tiny-llama")
    write_rows(str(path), args, [Row("colocated", 860.0), Row("engine", 2784.6)])
    assert json.loads(path.read_text()) == {
        "config": {"concurrency": [1, 32], "model": "tiny-llama"},
        "rows": [{"mode": "colocated", "tok_s": 860.0}, {"mode": "engine", "tok_s": 2784.6}]}
    write_rows(None, args, [Row("x", 1.0)])  # no --json: nothing written
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
