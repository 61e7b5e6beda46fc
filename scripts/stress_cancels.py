"""Cancels under load: many concurrent gRPC streams against ``llm``, some cancelled mid-stream.

Starts its own tritonserver on a repository like the shipped ``model_repository/`` (1 prefill +
1 decode, the same engine sizes, ``--model``, default tiny-llama; ``--deployment colocated``: one
worker), with a kvbridge master as ``triton-pd serve`` runs it, warms it up, then runs ``--streams`` closed-loop clients for ``--duration`` seconds
(backends/launch/cancel_load.py): each request is greedy, ``--max-tokens`` long, and a seeded
``--cancel-fraction`` of them is cancelled by the client (``stop_stream(cancel_requests=True)``)
after 1..``--max-cancel-chunks`` chunks. Afterwards it checks, and reports:
- every request's outcome (completed, cancelled, error with its message, hung);
- completed texts equal the single-process engine's greedy output for their prompt (``--model``);
- crashes: tritonserver or any stub process gone, crash lines in the server log;
- the server still answers: ready, and a fresh greedy request equals the engine's output;
- KV leak: ``pd_kv_blocks_used`` of every worker back to 0 (within 30 s);
- RSS of tritonserver and every stub after warm-up and at the end.
The clients run in a child process; this one holds the server and the kvbridge master, as
``triton-pd serve`` does. Exit status 0 only when nothing failed. Prints a table; ``--json FILE``
writes it (and, after a failure, the server log to FILE.server.log; ``--log`` always keeps it).

    python3 scripts/stress_cancels.py [--streams 64] [--cancel-fraction 0.2] [--duration 60]
        [--max-tokens 48] [--seed 0] [--model tiny-llama] [--deployment disaggregated|colocated]
        [--json FILE] [--log FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from backends.launch.cancel_load import LoadConfig, LoadReport, run_load_in_child
from backends.launch.deploy import Deployment, write_repository
from backends.launch.session import running_server
from backends.serving.engine_spec import EngineSpec

CRASH_PATTERNS = ("Segmentation fault", "double free", "corruption", "lock_exception", "terminate called",
                  "is not healthy", "Aborted", "core dumped", "Failed to ")
PROMPTS = tuple(f"Stress prompt {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 3)
                for i in range(16))
FRESH_PROMPT = "A fresh request after the storm"


@dataclass(slots=True)
class Result:
    model: str
    deployment: str
    streams: int
    duration_s: float
    wall_s: float = 0.0
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    errors: int = 0
    hung: int = 0
    wrong_text: int = 0
    first_failure_s: float | None = None
    server_alive: bool = False
    processes_lost: list[str] = field(default_factory=list)
    crash_lines: list[str] = field(default_factory=list)
    fresh_ok: bool = False
    fresh_error: str = ""
    kv_used_end: dict[str, float] = field(default_factory=dict)
    rss_mb_start: dict[str, float] = field(default_factory=dict)
    rss_mb_end: dict[str, float] = field(default_factory=dict)
    error_messages: list[str] = field(default_factory=list)

    @property
    def crashed(self) -> bool:
        return not self.server_alive or bool(self.processes_lost) or bool(self.crash_lines)

    @property
    def kv_leaked(self) -> bool:
        return not self.kv_used_end or any(v != 0 for v in self.kv_used_end.values())

    @property
    def ok(self) -> bool:
        return (not self.crashed and not self.kv_leaked and self.fresh_ok and self.errors == 0
                and self.hung == 0 and self.wrong_text == 0)


def group_processes(pgid: int) -> dict[str, tuple[int, float]]:
    """name → (pid, RSS MiB) of tritonserver and its stubs (a stub is named by its model)."""
    found: dict[str, tuple[int, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
            rss_pages = int((stat.parent / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if int(fields[2]) != pgid:  # fields[2] is the process group (after state, ppid)
            continue
        exe = Path(cmdline[0].decode(errors="replace")).name
        if exe == "tritonserver":
            name = "tritonserver"
        elif exe.startswith("triton_python_backend_stub") and len(cmdline) > 1:
            name = Path(cmdline[1].decode(errors="replace")).parent.parent.name  # .../<model>/1/model.py
        else:
            continue
        found[name] = (int(stat.parent.name), rss_pages * 4096 / 2**20)
    return found


def engine_texts(model: str, prompts: tuple[str, ...], max_tokens: int) -> dict[str, str]:
    from backends.engine.engine import LLMEngine
    from backends.engine.engine_config import EngineConfig
    from backends.engine.sampling_params import SamplingParams

    spec = EngineSpec(source=model)
    engine = LLMEngine(model, EngineConfig(num_blocks=spec.num_blocks, max_model_len=spec.max_model_len))
    tok = engine.tokenizer
    results = engine.generate([tok.encode(p) for p in prompts],
                              SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    # What the server sends in all: the decode without its trailing U+FFFD (bytes that max_tokens
    # cut or that form no character are never sent; backends/engine/text_stream.py)
    return {p: tok.decode(list(r.output_token_ids)).rstrip("\ufffd") for p, r in zip(prompts, results, strict=True)}


def kv_used(metrics_url: str) -> dict[str, float]:
    text = requests.get(metrics_url, timeout=10).text
    return {m: float(v) for m, v in re.findall(r'^pd_kv_blocks_used\{model="(\w+)"\} ([\d.e+-]+)$', text, re.M)}


def wait_kv_released(metrics_url: str, timeout_s: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    used: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            used = kv_used(metrics_url)
        except requests.RequestException:
            return used
        if used and all(v == 0 for v in used.values()):
            break
        time.sleep(0.5)
    return used


def fresh_request(http_url: str, expected: str, max_tokens: int) -> str:
    """'' when a new greedy request returns the engine's text, else what went wrong."""
    body: dict[str, str | bool] = {"text_input": FRESH_PROMPT, "exclude_input_in_output": True,
                                   "sampling_parameters": json.dumps({"max_tokens": max_tokens, "temperature": 0,
                                                                      "ignore_eos": True})}
    try:
        r = requests.post(f"http://{http_url}/v2/models/llm/generate", json=body, timeout=30)
    except requests.RequestException as exc:
        return f"{type(exc).__name__}: {exc}"
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    got = r.json().get("text_output")
    return "" if got == expected else f"text {got!r} != engine {expected!r}"


def crash_lines(log: Path, offset: int) -> list[str]:
    text = log.read_text(errors="replace")[offset:] if log.exists() else ""
    return [line.strip()[:240] for line in text.splitlines() if any(p in line for p in CRASH_PATTERNS)][:20]


def absorb(result: Result, report: LoadReport, expected: dict[str, str]) -> None:
    counts = report.counts()
    result.wall_s = report.wall_s
    result.requests = len(report.outcomes)
    result.completed, result.cancelled = counts["completed"], counts["cancelled"]
    result.errors, result.hung = counts["error"], counts["hung"]
    result.wrong_text = sum(1 for o in report.outcomes
                            if o.kind == "completed" and o.text != expected[o.planned.prompt])
    result.error_messages = report.errors()[:10]
    result.first_failure_s = report.first_failure_s()


def run(args: argparse.Namespace, work: Path) -> Result:
    expected = engine_texts(args.model, (*PROMPTS, FRESH_PROMPT), args.max_tokens)
    repo = work / "models"
    write_repository(Deployment(model=args.model, disaggregation=args.deployment == "disaggregated",
                                engine=EngineSpec(source=args.model)), repo)
    result = Result(args.model, args.deployment, args.streams, args.duration)
    with running_server(repo, work / "server", args.ready_timeout) as server:
        if server.pid is None or server.log_path is None:
            raise RuntimeError("running_server yielded a server without a pid or a log")
        metrics_url = f"http://127.0.0.1:{server.spec.ports.metrics_port}/metrics"
        warm = fresh_request(server.http_url, expected[FRESH_PROMPT], args.max_tokens)
        if warm:
            raise RuntimeError(f"warm-up request failed: {warm}")
        before = group_processes(server.pid)
        result.rss_mb_start = {n: round(rss, 1) for n, (_, rss) in sorted(before.items())}
        log_offset = len(server.log_path.read_text(errors="replace"))
        config = LoadConfig(PROMPTS, args.streams, args.cancel_fraction, args.max_cancel_chunks,
                            args.max_tokens, args.duration, args.request_timeout, args.seed)
        report = run_load_in_child(server.grpc_url, config)  # this process hosts the master
        absorb(result, report, expected)
        result.kv_used_end = wait_kv_released(metrics_url)
        result.fresh_error = fresh_request(server.http_url, expected[FRESH_PROMPT], args.max_tokens)
        result.fresh_ok = not result.fresh_error
        after = group_processes(server.pid)
        result.rss_mb_end = {n: round(rss, 1) for n, (_, rss) in sorted(after.items())}
        result.processes_lost = sorted(n for n, (pid, _) in before.items() if after.get(n, (0, 0))[0] != pid)
        result.server_alive = server.poll() is None and server.is_ready()
        result.crash_lines = crash_lines(server.log_path, log_offset)
    log_copy = args.log or (f"{args.json}.server.log" if args.json and not result.ok else None)
    if log_copy:
        shutil.copyfile(server.log_path, log_copy)
    return result


def print_table(r: Result) -> None:
    print(f"{r.model}, deployment {r.deployment}, {r.streams} streams, {r.duration_s:.0f}s load ({r.wall_s:.1f}s wall)")
    print(f"{'requests':>8} {'completed':>9} {'cancelled':>9} {'errors':>6} {'hung':>5} {'wrong':>5} "
          f"{'crash':>5} {'kv leak':>7} {'fresh':>5}")
    print(f"{r.requests:>8} {r.completed:>9} {r.cancelled:>9} {r.errors:>6} {r.hung:>5} {r.wrong_text:>5} "
          f"{'yes' if r.crashed else 'no':>5} {'yes' if r.kv_leaked else 'no':>7} {'ok' if r.fresh_ok else 'FAIL':>5}")
    if r.first_failure_s is not None:
        print(f"first request that errored or hung started {r.first_failure_s:.1f}s into the load")
    print(f"KV blocks in use at the end: {r.kv_used_end}")
    for name in r.rss_mb_start:
        print(f"RSS {name}: {r.rss_mb_start[name]:.0f} -> {r.rss_mb_end.get(name, float('nan')):.0f} MiB")
    for label, lines in (("processes lost", r.processes_lost), ("crash lines", r.crash_lines),
                         ("errors", r.error_messages)):
        for line in lines:
            print(f"{label}: {line}")
    if r.fresh_error:
        print(f"fresh request: {r.fresh_error}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--cancel-fraction", type=float, default=0.2)
    parser.add_argument("--max-cancel-chunks", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="tiny-llama", help="what the workers serve (a preset or a path)")
    parser.add_argument("--deployment", choices=("disaggregated", "colocated"), default="disaggregated")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--log", metavar="FILE", help="keep a copy of the tritonserver log")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.request_timeout <= 0:
        parser.error(f"--duration and --request-timeout must be > 0, got {args.duration}, {args.request_timeout}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stress-cancels-") as tmp:
        try:
            result = run(args, Path(tmp))
        except (RuntimeError, ValueError) as exc:
            print(f"stress_cancels: {exc}", file=sys.stderr)
            return 2
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "json"},
                       "result": asdict(result), "crashed": result.crashed, "kv_leaked": result.kv_leaked,
                       "ok": result.ok}, f, indent=2)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
