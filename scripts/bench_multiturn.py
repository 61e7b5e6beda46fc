"""Multi-turn prefix reuse through a real tritonserver: TTFT with reuse against without, per turn.

Starts one disaggregated server (1 prefill + 1 decode worker, ``--model``, default tiny-llama)
and runs ``--conversations`` conversations of ``--turns`` turns, one request at a time (gRPC
streaming to ``llm``, greedy, ``--reply-tokens`` per reply, ignore_eos). Turn t sends the
conversation so far (every earlier user text and reply) plus a new user text, sized so that the
last turn's prompt is about ``--history`` tokens. Beside each turn it sends a control prompt of
the same length that no node holds (fresh random text): the same work without reuse. Per turn
it reports the median TTFT of both and their ratio, the prefix-hit tokens and the KV bytes the
request moved between workers (the server's own counters: ``pd_prefix_hit_tokens_total`` and
``pd_kv_transfer_bytes_total`` of ``llm``), and the bytes of the prompt's full blocks that the
decode node did not hold before the turn (the kvbridge master's index): what an ideal plan
moves at most. Prints a table; ``--json FILE`` writes it.

With the byte-level presets a reply re-encodes to the ids generated only where it is valid
UTF-8 (random weights emit many other bytes, which the text replaces), so later turns reuse the
earlier prompts and only part of the replies; a real model's tokenizer round-trips its replies.

    python3 scripts/bench_multiturn.py [--model tiny-llama] [--conversations 8] [--turns 6]
                                       [--history 2000] [--reply-tokens 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import string
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from backends.launch.bench_json import write_rows
from backends.launch.client import StreamingClient
from backends.launch.deploy import Deployment, EngineSpec, write_repository
from backends.launch.session import running_server
from backends.serving.kv_master import connect
from backends.serving.tokenizers import load_tokenizer
from kvbridge.hashing import hash_blocks

BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class TurnRow:
    turn: int
    prompt_tokens: int  # median over the conversations
    ttft_reuse_ms: float
    ttft_cold_ms: float
    speedup: float  # cold / reuse
    prefix_hit_tokens: float  # mean per request
    kv_bytes_moved: float  # mean per request
    kv_bytes_lacked: float  # mean per request: full prompt blocks the decode node did not hold


def user_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(length))


class Counters:
    """The ``llm`` model's counters from tritonserver's metrics endpoint."""

    def __init__(self, url: str) -> None:
        self._url = url

    def read(self) -> dict[str, float]:
        text = urllib.request.urlopen(self._url, timeout=10).read().decode()
        values = {}
        for name in ("pd_prompt_tokens_total", "pd_prefix_hit_tokens_total", "pd_kv_transfer_bytes_total"):
            found = re.findall(rf'^{name}\{{model="llm"\}} ([\d.e+-]+)$', text, re.MULTILINE)
            values[name] = float(found[0]) if found else 0.0
        return values

    def after(self, before: dict[str, float], prompt_tokens: int) -> dict[str, float]:
        """The counters once a request of ``prompt_tokens`` tokens sent after ``before`` is in
        (the orchestrator records a request's metrics just after its final response)."""
        deadline = time.monotonic() + 5
        now = self.read()
        while now["pd_prompt_tokens_total"] < before["pd_prompt_tokens_total"] + prompt_tokens and \
                time.monotonic() < deadline:
            time.sleep(0.02)
            now = self.read()
        return now


def decode_held_blocks(master: object, ids: list[int], model: str) -> int:
    """Full blocks of ``ids`` that a decode node holds, by the master's index."""
    matches = master.lookup(hash_blocks(ids, BLOCK_SIZE, model))  # type: ignore[attr-defined]
    return max((m.num_blocks for m in matches if "/decode#" in m.node_id), default=0)


def run(args: argparse.Namespace, work: Path) -> list[TurnRow]:
    dep = Deployment(model=args.model, engine=EngineSpec(source=args.model, max_model_len=args.history + 512,
                                                         num_blocks=args.blocks))
    repo = work / "repo"
    write_repository(dep, repo)
    tok = load_tokenizer(args.model)
    per_turn = max(1, (args.history - args.turns * args.reply_tokens) // args.turns)
    with running_server(repo, work / "server", args.ready_timeout) as server:
        counters = Counters(f"http://{server.spec.ports.address}:{server.spec.ports.metrics_port}/metrics")
        master = connect("bench-multiturn-observer")
        if master is None:
            raise RuntimeError("no kvbridge master (KVBRIDGE_MASTER unset)")
        block_bytes = None
        rows = []
        histories = ["" for _ in range(args.conversations)]
        rng = random.Random(0)
        with StreamingClient(server.grpc_url) as client:
            client.generate("warm up", 4, ignore_eos=True)
            for turn in range(1, args.turns + 1):
                reuse, cold, hits, moved, lacked, lengths = [], [], [], [], [], []
                for c in range(args.conversations):
                    prompt = histories[c] + user_text(rng, per_turn)
                    ids = list(tok.encode(prompt))
                    held = decode_held_blocks(master, ids, args.model)
                    before = counters.read()
                    result = client.generate(prompt, args.reply_tokens, ignore_eos=True)
                    after = counters.after(before, len(ids))
                    reuse.append(result.ttft_s * 1e3)
                    hits.append(after["pd_prefix_hit_tokens_total"] - before["pd_prefix_hit_tokens_total"])
                    moved.append(after["pd_kv_transfer_bytes_total"] - before["pd_kv_transfer_bytes_total"])
                    if block_bytes is None and turn == 1 and moved[-1]:
                        block_bytes = moved[-1] / -(-len(ids) // BLOCK_SIZE)  # turn 1 moves every block
                    lacked.append((len(ids) // BLOCK_SIZE - held) * (block_bytes or 0))
                    lengths.append(len(ids))
                    if args.verbose:
                        print(f"  conv {c} turn {turn}: {len(ids)} tokens, decode held {held} blocks, hit "
                              f"{hits[-1]:.0f}, moved {moved[-1]:.0f} B, TTFT {reuse[-1]:.1f} ms", file=sys.stderr)
                    histories[c] = prompt + result.text
                    control = user_text(random.Random(f"cold-{turn}-{c}"), len(prompt))
                    before = counters.read()
                    cold.append(client.generate(control, args.reply_tokens, ignore_eos=True).ttft_s * 1e3)
                    counters.after(before, len(tok.encode(control)))
                rows.append(TurnRow(turn, int(statistics.median(lengths)), statistics.median(reuse),
                                    statistics.median(cold), statistics.median(cold) / statistics.median(reuse),
                                    statistics.mean(hits), statistics.mean(moved), statistics.mean(lacked)))
                print(f"[turn {turn}] {format_row(rows[-1])}", file=sys.stderr)
        master.close()
    return rows


HEADER = (f"{'turn':>4} {'prompt tok':>10} {'TTFT reuse':>11} {'TTFT cold':>10} {'cold/reuse':>10} "
          f"{'hit tok':>8} {'KV moved B':>11} {'KV lacked B':>12}")


def format_row(r: TurnRow) -> str:
    return (f"{r.turn:>4} {r.prompt_tokens:>10} {r.ttft_reuse_ms:>11.1f} {r.ttft_cold_ms:>10.1f} {r.speedup:>10.2f} "
            f"{r.prefix_hit_tokens:>8.0f} {r.kv_bytes_moved:>11.0f} {r.kv_bytes_lacked:>12.0f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--history", type=int, default=2000, help="about this many prompt tokens at the last turn")
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=2048, help="KV blocks per worker")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--verbose", action="store_true", help="one line per request on stderr")
    args = parser.parse_args(argv)
    for name in ("conversations", "turns", "history", "reply_tokens", "blocks"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-multiturn-") as tmp:
        rows = run(args, Path(tmp))
    print(f"{args.model}, {args.conversations} conversations x {args.turns} turns, {args.reply_tokens}-token "
          "replies; TTFT medians in ms; KV bytes per request")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    write_rows(args.json, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
