"""perf_analyzer and genai-perf against ``llm`` and ``ensemble``, colocated beside disaggregated.

For each mode it starts its own server, as bench_serving.py does (colocated: a repository
generated from the default deployment with disaggregation off; disaggregated: the shipped
``model_repository/``), then, for each API and concurrency C, runs perf_analyzer (``--input-data``
in the API's style: vLLM's for ``llm``, TensorRT-LLM's for ``ensemble``; gRPC streaming) and
genai-perf (``--backend vllm`` / ``--backend tensorrtllm``, the model's own tokenizer) for
``--requests`` requests of ``--prompt-len`` prompt tokens and exactly ``--output-len`` output
tokens. perf_analyzer rows are computed from its per-request export (TTFT = first response,
ITL = (last - first response) / (tokens - 1)); genai-perf rows are genai-perf's own numbers
(it counts tokens by re-tokenizing the streamed text). Prints a table; ``--json FILE`` writes it.
Needs ``python3 -m backends.launch.perf_analyzer install`` (scripts/test.sh runs it).

    python3 scripts/bench_perf_clients.py [--model smollm2-135m-instruct] [--concurrency 1 4]
        [--requests 16] [--prompt-len 64] [--output-len 32] [--modes colocated disaggregated]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from backends.engine.loader import export_preset
from backends.engine.sources import DEFAULT_MODEL, SourceKind, resolve_source
from backends.launch import perf_runs
from backends.launch.bench_json import write_rows
from backends.launch.deploy import Deployment
from backends.launch.install import repo_root
from backends.launch.perf_analyzer import PerfAnalyzer, find
from backends.launch.session import Repository, colocated_repository, running_server

MODES = ("colocated", "disaggregated")
TOOLS = ("perf_analyzer", "genai-perf")
WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from", "that", "this", "which", "paris", "france", "river"]


@dataclass(frozen=True, slots=True)
class Row:
    mode: str
    tool: str
    api: str
    concurrency: int
    summary: perf_runs.Summary | None
    error: str = ""


def tokenizer_dir(model: str, work: Path) -> Path:
    """A directory AutoTokenizer loads: the preset exported, the GGUF's converted checkpoint, or
    the checkpoint directory itself."""
    source = resolve_source(model)
    if source.kind == SourceKind.PRESET:
        return export_preset(source.location, work / "tokenizer")
    if source.kind == SourceKind.GGUF:
        from backends.engine.gguf_loader import converted_checkpoint

        return converted_checkpoint(source.location)
    return Path(source.location)


def repository(mode: str, model: str, work: Path) -> Repository:
    if mode == "colocated":
        return colocated_repository(work / "colocated", Deployment(model=model, disaggregation=False))
    if model == DEFAULT_MODEL:
        return Repository(repo_root() / "model_repository", "disaggregated: 1 prefill + 1 decode worker")
    return Repository(_written(Deployment(model=model), work / "disaggregated"), "disaggregated")


def _written(deployment: Deployment, dest: Path) -> Path:
    from backends.launch.deploy import write_repository

    write_repository(deployment, dest)
    return dest


def _run(cmd: list[str], env: dict[str, str] | None, timeout_s: float) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(cmd[0]).name} exited {done.returncode}: {' | '.join(tail)}")
    return done.stdout + done.stderr


def perf_analyzer_row(tool: PerfAnalyzer, url: str, api: str, c: int, args: argparse.Namespace,
                      work: Path) -> perf_runs.Summary:
    rng = random.Random(c)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(args.prompt_len)) for _ in range(args.requests)]
    data, export = work / f"pa-{api}-{c}.json", work / f"pa-{api}-{c}-export.json"
    data.write_text(json.dumps(perf_runs.input_data(api, prompts, args.output_len)))
    _run([str(tool.path), *perf_runs.perf_analyzer_args(api, url, data, export, c, args.requests)], None, 3600)
    records = perf_runs.read_export(export)
    wrong = [r.num_output_tokens for r in records if r.num_output_tokens != args.output_len]
    if len(records) != args.requests or wrong:
        raise RuntimeError(f"{len(records)} of {args.requests} requests; output token counts off: {wrong[:4]}")
    return perf_runs.summarize(records)


def genai_perf_row(tool: PerfAnalyzer, url: str, api: str, c: int, args: argparse.Namespace, tokenizer: Path,
                   work: Path) -> perf_runs.Summary:
    genai_perf = shutil.which("genai-perf")
    if genai_perf is None:
        raise RuntimeError("genai-perf is not installed (pip install -e '.[test]')")
    artifacts = work / f"gp-{api}-{c}"
    cmd = perf_runs.genai_perf_args(api, url, tokenizer, artifacts, c, args.requests, args.prompt_len,
                                    args.output_len)
    _run([genai_perf, *cmd], tool.env(), 3600)
    return perf_runs.read_genai_perf(artifacts)


def bench_mode(mode: str, tool: PerfAnalyzer, args: argparse.Namespace, work: Path) -> list[Row]:
    levels = [(t, a, c) for t in TOOLS for a in perf_runs.APIS for c in args.concurrency]
    try:
        tokenizer = tokenizer_dir(args.model, work)
        repo = repository(mode, args.model, work)
        print(f"[{mode}] starting tritonserver on {repo.path} ({repo.description})", file=sys.stderr)
        with running_server(repo.path, work / f"server-{mode}", args.ready_timeout) as server:
            rows = []
            runs = work / f"runs-{mode}"
            runs.mkdir()
            for name, api, c in levels:
                try:
                    if name == "perf_analyzer":
                        summary = perf_analyzer_row(tool, server.grpc_url, api, c, args, runs)
                    else:
                        summary = genai_perf_row(tool, server.grpc_url, api, c, args, tokenizer, runs)
                    rows.append(Row(mode, name, api, c, summary))
                except Exception as exc:  # reported in its row; the other levels still run
                    rows.append(Row(mode, name, api, c, None, f"{type(exc).__name__}: {exc}"))
                print(f"[{mode}] {format_row(rows[-1])}", file=sys.stderr)
            return rows
    except Exception as exc:
        return [Row(mode, t, a, c, None, f"{type(exc).__name__}: {exc}") for t, a, c in levels]


HEADER = (f"{'mode':<14} {'tool':<13} {'api':<8} {'conc':>4} {'reqs':>4} {'req/s':>6} {'out tok/s':>9} "
          f"{'TTFT p50':>8} {'TTFT p99':>8} {'ITL p50':>7} {'ITL p99':>7}")


def format_row(r: Row) -> str:
    head = f"{r.mode:<14} {r.tool:<13} {r.api:<8} {r.concurrency:>4}"
    s = r.summary
    if s is None:
        return f"{head} FAILED: {r.error}"
    return (f"{head} {s.num_requests:>4} {s.request_s:>6.2f} {s.output_tok_s:>9.1f} {s.ttft_p50_ms:>8.1f} "
            f"{s.ttft_p99_ms:>8.1f} {s.itl_p50_ms:>7.2f} {s.itl_p99_ms:>7.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    for name in ("requests", "prompt_len", "output_len"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if any(c <= 0 for c in args.concurrency):
        parser.error(f"--concurrency values must be > 0, got {args.concurrency}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tool = find()
    if tool is None:
        print("perf_analyzer is not set up: python3 -m backends.launch.perf_analyzer install", file=sys.stderr)
        return 1
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-perf-clients-") as tmp:
        for mode in args.modes:
            rows.extend(bench_mode(mode, tool, args, Path(tmp)))
    print(f"model {args.model}; {args.requests} requests per level, prompt ~{args.prompt_len} tokens, "
          f"output {args.output_len} tokens; latencies in ms")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    write_rows(args.json, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
