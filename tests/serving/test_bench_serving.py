"""The serving benchmark's bookkeeping: per-request times and the summarized row (no server)."""

from __future__ import annotations

import math
import sys

from backends.launch.client import StreamResult
from backends.launch.install import repo_root

sys.path.insert(0, str(repo_root() / "scripts"))
import bench_serving  # noqa: E402


def result(start: float, token_times: tuple[float, ...], end: float) -> StreamResult:
    return StreamResult("x" * len(token_times), "length", len(token_times), start, token_times, end)


def test_stream_result_times() -> None:
    r = result(10.0, (10.5, 10.5, 11.0, 12.0), 12.25)
    assert (r.ttft_s, r.tpot_s, r.e2e_s) == (0.5, 0.5, 2.25)
    assert result(0.0, (1.0,), 1.0).tpot_s is None
    assert result(0.0, (), 2.0).ttft_s == 2.0


def test_summarize_percentiles_and_throughput() -> None:
    results = [result(0.0, (0.1, 0.2, 0.3), 0.3), result(0.0, (0.3, 0.5, 0.7), 0.8)]
    row = bench_serving.summarize("colocated", 2, results, wall_s=2.0)
    assert (row.mode, row.concurrency, row.num_requests, row.output_tok_s, row.error) == \
        ("colocated", 2, 2, 3.0, "")
    assert math.isclose(row.ttft_p50_ms, 200.0) and math.isclose(row.ttft_p99_ms, 298.0)
    assert math.isclose(row.tpot_p50_ms, 150.0) and math.isclose(row.tpot_p99_ms, 199.0)
    assert math.isclose(row.e2e_p50_ms, 550.0) and math.isclose(row.e2e_p99_ms, 795.0)


def test_failed_row_is_printed_with_its_error() -> None:
    row = bench_serving.failed_row("disaggregated", 4, "RuntimeError: no KV handle")
    assert (row.num_requests, math.isnan(row.ttft_p50_ms)) == (0, True)
    assert bench_serving.format_row(row) == "disaggregated     4 FAILED: RuntimeError: no KV handle"


def test_prompts_are_one_token_per_character() -> None:
    import random

    prompt = bench_serving.make_prompt(random.Random(0), 64)
    assert len(prompt) == 64 and prompt == bench_serving.make_prompt(random.Random(0), 64)
    assert set(prompt) <= set("abcdefghijklmnopqrstuvwxyz ")
