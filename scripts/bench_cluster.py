"""Cross-node prefix reuse, measured at the worker level (issue 13): two workers (A, B) of two
"servers" (distinct server ids), each an engine with its kvbridge node, and one master, in this
process. A computes a long prompt; B then serves the same prompt plus a new suffix either cold
(recomputing everything) or by pulling A's blocks (PrefixSource, shm on one host). Reports
time to first token on B, prefix-hit tokens and KV bytes pulled; prints a table, writes JSON.

  PYTHONPATH=. python3 scripts/bench_cluster.py --model smollm2-135m-instruct --prompt-len 2000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from backends.engine.sampling_params import SamplingParams
from backends.serving import kv_master
from backends.serving.engine_spec import EngineSpec
from backends.serving.kv import WorkerLoad, build_worker
from kvbridge.master.client import MasterClient
from kvbridge.master.server import MasterConfig, MasterThread


def first_token_s(worker: Any, rid: str, prompt: list[int], source: Any) -> tuple[float, int]:
    engine, _ = worker
    start = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                       kv_source=source)
    cached = 0
    while engine.has_unfinished():
        for out in engine.step():
            cached = max(cached, out.num_cached_tokens)
    elapsed = time.perf_counter() - start
    if source is not None:
        source.close()
    return elapsed, cached


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--prompt-len", type=int, default=2000)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = EngineSpec(source=args.model, num_blocks=(args.prompt_len + args.suffix_len) // 16 * 2 + 16,
                      max_model_len=args.prompt_len + args.suffix_len + 16, max_num_seqs=4)
    gen = torch.Generator().manual_seed(0)
    with MasterThread(MasterConfig(heartbeat_timeout_s=60.0)) as master:
        host, port = master.address
        os.environ[kv_master.MASTER_ENV] = f"{host}:{port}"
        os.environ[kv_master.SERVER_ENV] = "server-a"
        a = build_worker(spec, "prefill")
        os.environ[kv_master.SERVER_ENV] = "server-b"
        b = build_worker(spec, "prefill")
        for _, transfer in (a, b):
            transfer.start_heartbeats(lambda: WorkerLoad(0, 0, 0))
        vocab = a[0].model_config.vocab_size
        rows: dict[str, list[float]] = {"cold": [], "remote": []}
        info: dict[str, Any] = {}
        try:
            for i in range(args.repeat):
                for mode in ("cold", "remote"):  # a fresh prefix each time: B never saw it
                    shared = torch.randint(3, min(vocab, 30000), (args.prompt_len,), generator=gen).tolist()
                    suffix = torch.randint(3, min(vocab, 30000), (args.suffix_len,), generator=gen).tolist()
                    prompt = shared + suffix
                    source = None
                    if mode == "remote":
                        first_token_s(a, f"a{i}", shared, None)
                        with MasterClient(host, port, node_id="bench") as client:
                            want = len(shared) // 16
                            hashes = b[1].node.hashes(shared[:want * 16])
                            deadline = time.monotonic() + 10
                            while time.monotonic() < deadline and not any(
                                    m.num_blocks >= want for m in client.lookup(hashes)):
                                time.sleep(0.01)
                        start = time.perf_counter()
                        remote = b[1].find_remote(prompt)
                        source = b[1].prefix_source(f"b{i}", prompt, remote) if remote else None
                        if source is None:
                            raise SystemExit("bench_cluster: B found no remote prefix to pull")
                        lookup_s = time.perf_counter() - start
                        info["pulled_bytes"] = getattr(source, "num_pulled_bytes", 0)
                        info["lookup_ms"] = lookup_s * 1e3
                    else:
                        lookup_s = 0.0
                    elapsed, cached = first_token_s(b, f"{mode}{i}", prompt, source)
                    rows[mode].append(elapsed + lookup_s)
                    info[f"{mode}_cached"] = cached
        finally:
            for _, transfer in (a, b):
                transfer.close()
    cold, remote = statistics.median(rows["cold"]), statistics.median(rows["remote"])
    print(f"model {args.model}, prompt {args.prompt_len} + suffix {args.suffix_len} tokens, "
          f"median of {args.repeat}, {args.threads} torch thread(s)")
    print(f"{'on B':>8s} {'TTFT ms':>9s} {'prefix hit':>10s} {'KV pulled':>12s}")
    print(f"{'cold':>8s} {cold * 1e3:9.1f} {info['cold_cached']:10d} {0:12d}")
    print(f"{'remote':>8s} {remote * 1e3:9.1f} {info['remote_cached']:10d} {info['pulled_bytes']:12d}")
    print(f"TTFT cold / remote: {cold / remote:.2f}x (incl. a {info['lookup_ms']:.2f} ms master lookup)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cold_s": rows["cold"], "remote_s": rows["remote"], **info}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
