"""Decode TPOT of running streams with and without a concurrent KV import, on the engine alone.

--streams greedy streams (default 16) decode --steps tokens each; TPOT is the time between two
consecutive `step()` returns (every stream samples one token per step). The same window is run
without an import and with --imports imports (one after another) of an --import-len token
prompt's KV: a KVSource over host tensors (random KV in the cache dtype, pinned on CUDA), with
an optional --layer-delay-ms sleep per layer standing in for a network. An import request joins
the batch when its KV is in and ends after one more token. Prints TPOT p50/p99/max without
and with the imports, over the steps that ended with an import in flight, over the join steps
(the imported request's own first token, a cost any import has), and for an emulated blocking
import (the loop waits for the import before its next step, as the engine once did inside
`schedule()`), the with/without ratios, and how long each import took from `add_request` to
its first token. Runs alternate --repeat times on one engine; percentiles pool all runs.
`--json FILE` writes everything.

Models: presets (tiny-llama, tiny-mla; tiny-llama holds 2048 positions, so use
--import-len 1024 or less there) or bench_engine's real-size shapes (llama-1b, llama-8b).

    python3 scripts/bench_kv_import.py --model tiny-llama --import-len 1024
    python3 scripts/bench_kv_import.py --device cuda --dtype bfloat16 --model llama-1b
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from bench_models import SHAPES, random_shape_model

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.hooks import KVImportError
from backends.engine.kv_transfer import TensorKVSource
from backends.engine.loader import LoadedModel, load_model
from backends.engine.presets import PRESETS
from backends.engine.sampling_params import SamplingParams

WARMUP_STEPS = 3


class DelayedSource(TensorKVSource):
    """TensorKVSource that sleeps `delay_s` before each layer (never past the deadline)."""

    def __init__(self, num_tokens: int, layers: list[torch.Tensor], delay_s: float) -> None:
        super().__init__(num_tokens, layers)
        self.delay_s = delay_s

    def read_layer(self, layer: int, dst: torch.Tensor, deadline: float) -> None:
        if self.delay_s:
            time.sleep(max(0.0, min(self.delay_s, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                raise KVImportError(f"layer {layer}: deadline passed")
        super().read_layer(layer, dst, deadline)


@dataclass(frozen=True, slots=True)
class Row:
    condition: str
    num_steps: int
    tpot_p50_ms: float
    tpot_p99_ms: float
    tpot_max_ms: float


@dataclass(slots=True)
class Window:
    """Measured runs: TPOT samples (s), each step's phase, import times (s)."""

    tpot_s: list[float]
    phases: list[str]  # "" | "importing" (ended with an import in flight) | "join"
    import_s: list[float]

    def extend(self, other: Window) -> None:
        self.tpot_s += other.tpot_s
        self.phases += other.phases
        self.import_s += other.import_s

    def samples(self, phase: str) -> list[float]:
        return [t for t, p in zip(self.tpot_s, self.phases, strict=True) if p == phase]


def tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 259, (n,), generator=gen).tolist()


def make_engine(loaded: LoadedModel, args: argparse.Namespace) -> LLMEngine:
    mc = loaded.config
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    per_seq_pad = 2 * 64  # block rounding (64-token MLA blocks) and a little growth
    num_tokens = (args.streams * (args.prompt_len + WARMUP_STEPS + args.steps + per_seq_pad)
                  + 2 * (args.import_len + per_seq_pad))
    config = EngineConfig(
        kv_cache_memory_bytes=num_tokens * mc.num_layers * mc.kv_width * elem,
        max_num_seqs=args.streams + 2,
        max_num_batched_tokens=max(2048, args.prompt_len),
        max_model_len=max(args.import_len, args.prompt_len + WARMUP_STEPS + args.steps) + 64,
        device=args.device,
        dtype=args.dtype,
    )
    return LLMEngine(loaded, config)


def import_layers(engine: LLMEngine, num_tokens: int, device: str) -> list[torch.Tensor]:
    layout = engine.kv_layout
    num_blocks = -(-num_tokens // layout.block_size)
    dtype = getattr(torch, layout.dtype)
    gen = torch.Generator().manual_seed(num_tokens)
    layers = []
    for _ in range(layout.num_layers):
        layer = torch.randn(num_blocks, layout.block_size, layout.kv_width, generator=gen)
        layer = layer.to(dtype)
        layers.append(layer.pin_memory() if device.startswith("cuda") else layer)
    return layers


def run_window(engine: LLMEngine, args: argparse.Namespace, run: int, imports: int,
               layers: list[torch.Tensor], *, blocking: bool = False) -> Window:
    """Start the streams, decode WARMUP_STEPS, then time --steps steps, importing `imports`
    times back to back. `blocking` emulates an import that stalls the step loop: the loop
    waits for the import to end before the next step."""
    gen = torch.Generator().manual_seed(run)
    total = WARMUP_STEPS + args.steps + 4
    stream_params = SamplingParams(max_tokens=total, temperature=0.0, ignore_eos=True)
    streams = [f"r{run}-s{i}" for i in range(args.streams)]
    for rid in streams:
        engine.add_request(rid, tokens(gen, args.prompt_len), stream_params)
    started: set[str] = set()
    while len(started) < len(streams):  # prefill (possibly chunked) to every first token
        started.update(o.request_id for o in engine.step())
    for _ in range(WARMUP_STEPS):
        engine.step()
    import_params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    window = Window([], [], [])
    pending, current, added_at = imports, "", 0.0
    last = time.perf_counter()
    for _ in range(args.steps):
        if pending and not current:
            current = f"r{run}-import{imports - pending}"
            pending -= 1
            source = DelayedSource(args.import_len, layers, args.layer_delay_ms / 1000)
            added_at = time.perf_counter()
            engine.add_request(current, tokens(gen, args.import_len), import_params,
                               kv_source=source, prior_output_ids=[65])
        outs = engine.step()
        while blocking and importing(engine, current):
            if engine.scheduler.wait_for_imports(1.0):
                break  # ended; the next step's schedule() takes it
        now = time.perf_counter()
        sampled = {o.request_id for o in outs}
        if not sampled.issuperset(streams):
            raise RuntimeError(f"a step sampled {len(sampled & set(streams))} of {len(streams)}")
        window.tpot_s.append(now - last)
        last = now
        if current and current in sampled:  # it joined: its first new token
            window.phases.append("join")
            window.import_s.append(now - added_at)
            current = ""
        else:
            window.phases.append("importing" if importing(engine, current) else "")
    for rid in streams:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return window


def importing(engine: LLMEngine, request_id: str) -> bool:
    """The request waits for its KV (its job may have ended, not yet polled by a step)."""
    return bool(request_id) and any(s.request_id == request_id for s in engine.scheduler.importing)


def row(condition: str, samples_s: list[float]) -> Row:
    if not samples_s:
        return Row(condition, 0, math.nan, math.nan, math.nan)
    ms = np.asarray(samples_s) * 1000
    return Row(condition, len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
               float(ms.max()))


def load(args: argparse.Namespace) -> LoadedModel:
    dtype = getattr(torch, args.dtype)
    if args.model in SHAPES:
        return random_shape_model(args.model, dtype, args.device)
    return load_model(args.model, dtype=dtype, device=args.device)


@dataclass(frozen=True, slots=True)
class Result:
    model: str
    device: str
    dtype: str
    threads: int
    streams: int
    prompt_len: int
    steps: int
    repeat: int
    import_len: int
    imports_per_run: int
    layer_delay_ms: float
    # no import, with import (all steps), importing (steps that ended with the import in flight),
    # join (the step in which the imported request computed its token), blocking (emulated)
    rows: list[Row]
    ratio_p50: float  # with / without
    ratio_p99: float
    importing_ratio_p50: float
    import_ms: list[float]  # add_request -> the import request's first new token


def bench(args: argparse.Namespace) -> Result:
    loaded = load(args)
    engine = make_engine(loaded, args)
    layers = import_layers(engine, args.import_len, args.device)
    try:
        run_window(engine, args, -1, 1, layers)  # warm-up, import path included
        alone, mixed, blocked = Window([], [], []), Window([], [], []), Window([], [], [])
        for run in range(args.repeat):
            alone.extend(run_window(engine, args, run * 3, 0, layers))
            mixed.extend(run_window(engine, args, run * 3 + 1, args.imports, layers))
            blocked.extend(run_window(engine, args, run * 3 + 2, args.imports, layers,
                                      blocking=True))
    finally:
        engine.close()
    no, with_ = row("no import", alone.tpot_s), row("with import", mixed.tpot_s)
    during = row("importing", mixed.samples("importing"))
    rows = [no, with_, during, row("join step", mixed.samples("join")),
            row("blocking (emul.)", blocked.tpot_s)]
    return Result(
        args.model, args.device, args.dtype, torch.get_num_threads(), args.streams,
        args.prompt_len, args.steps, args.repeat, args.import_len, args.imports,
        args.layer_delay_ms, rows, with_.tpot_p50_ms / no.tpot_p50_ms,
        with_.tpot_p99_ms / no.tpot_p99_ms, during.tpot_p50_ms / no.tpot_p50_ms,
        [s * 1000 for s in mixed.import_s],
    )


def print_report(r: Result) -> None:
    print(f"{r.model} on {r.device} ({r.dtype}, {r.threads} threads): {r.streams} greedy "
          f"streams, prompt {r.prompt_len}, {r.steps} timed steps x {r.repeat} runs; import "
          f"{r.import_len} tokens x {r.imports_per_run} per run, {r.layer_delay_ms} ms/layer delay")
    print(f"{'condition':<17} {'steps':>6} {'TPOT p50 ms':>12} {'TPOT p99 ms':>12} {'max ms':>8}")
    for x in r.rows:
        print(f"{x.condition:<17} {x.num_steps:>6} {x.tpot_p50_ms:>12.2f} "
              f"{x.tpot_p99_ms:>12.2f} {x.tpot_max_ms:>8.2f}")
    print(f"ratio with/without import: p50 {r.ratio_p50:.3f}, p99 {r.ratio_p99:.3f}; "
          f"steps with the import in flight: p50 {r.importing_ratio_p50:.3f}")
    if r.import_ms:
        print(f"import add_request -> joined: median {float(np.median(r.import_ms)):.1f} ms, "
              f"max {max(r.import_ms):.1f} ms over {len(r.import_ms)} imports")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama",
                        help=f"preset ({', '.join(PRESETS)}) or shape ({', '.join(SHAPES)})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per run")
    parser.add_argument("--import-len", type=int, default=4096, help="tokens of imported KV")
    parser.add_argument("--imports", type=int, default=1, help="imports per run, back to back")
    parser.add_argument("--layer-delay-ms", type=float, default=0.0,
                        help="sleep before each imported layer (a slow transport)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per condition")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.model not in PRESETS and args.model not in SHAPES:
        parser.error(f"--model: unknown {args.model!r} (presets {', '.join(PRESETS)}; "
                     f"shapes {', '.join(SHAPES)})")
    for name in ("streams", "prompt_len", "steps", "import_len", "repeat", "imports"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench(args)
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
