"""Engine throughput beside HF transformers generate on the same weights and device.

For each model and batch size: prefill tokens/s (B prompts of --prompt-len tokens in one step,
to the first token) and decode tokens/s (the following --decode-tokens - 1 tokens of each
sequence), for the engine in each --modes decode mode (`capture`: CUDA graphs, `off`: the
plain eager path, `static`: the graphs' padded forward run eagerly) and for `transformers`
generate (greedy, KV cache, unpadded equal-length batch), with engine/HF ratios. With
--bandwidth-gbs (default 4800 on CUDA: an H200's HBM3e) a column gives the decode limit set by
streaming every weight and every sequence's KV once per step. --profile adds a table of
host-side time per decode step (schedule, model call, sample incl. the one device sync,
postprocess). Prints tables; `--json FILE` writes the rows.

Models: presets (tiny-llama, tiny-mla; HF loads their exported checkpoint) or named real-size
Llama shapes with a byte vocabulary (llama-1b: Llama-3.2-1B; llama-8b: Llama-3.1-8B), whose
random weights are made directly on the device in the bench dtype.

    python3 scripts/bench_engine.py [--models tiny-llama tiny-mla] [--batches 1 8 32]
    python3 scripts/bench_engine.py --device cuda --dtype bfloat16 --models llama-1b \\
        --batches 1 32 128 --prompt-len 512 --decode-tokens 128
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from bench_models import SHAPES, hf_model, random_shape_model

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.loader import LoadedModel, load_model
from backends.engine.presets import PRESETS
from backends.engine.sampling_params import SamplingParams
from backends.engine.sources import PACKAGED_MODELS

H200_GBS = 4800.0


@dataclass(frozen=True, slots=True)
class Row:
    model: str
    batch: int
    mode: str
    init_s: float
    engine_prefill_tok_s: float
    hf_prefill_tok_s: float | None
    prefill_ratio: float | None
    engine_decode_tok_s: float
    hf_decode_tok_s: float | None
    decode_ratio: float | None
    limit_decode_tok_s: float | None
    fraction_of_limit: float | None


def prompts(batch: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(3, 259, (batch, length), generator=gen).tolist()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepProfile:
    """Host time per decode step phase, by wrapping the engine's collaborators."""

    def __init__(self, engine: LLMEngine, device: str) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.active = False
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.runner, "execute", "model")
        self._wrap(engine.sampler, "sample", "sample+sync")
        self._wrap(engine, "_postprocess", "postprocess")
        self._wrap(engine, "_flush_text", "deferred text")
        self.device = device

    def _wrap(self, owner: Any, attr: str, phase: str) -> None:
        inner: Callable[..., Any] = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.active:
                    self.totals[phase] += time.perf_counter() - start

        setattr(owner, attr, timed)

    def per_step_ms(self) -> dict[str, float]:
        return {k: 1e3 * v / max(self.steps, 1) for k, v in self.totals.items()}


def run_engine(engine: LLMEngine, batch: int, prompt_len: int, new_tokens: int, device: str,
               profile: StepProfile | None = None) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one batch run to completion."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(batch, prompt_len)):
        engine.add_request(f"b{batch}-{time.monotonic_ns()}-{i}", prompt, params)
    sync(device)
    start = time.perf_counter()
    first = engine.step()  # the whole batch prefills and samples in one step
    sync(device)
    prefill_s = time.perf_counter() - start
    if len(first) not in (0, batch) or (not first and not engine.async_output):
        raise RuntimeError(f"prefill produced {len(first)} first tokens for batch {batch}")
    if profile is not None:
        profile.active = True
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    sync(device)
    decode_s = time.perf_counter() - start
    if profile is not None:
        profile.active = False
        profile.steps += steps
    return batch * prompt_len / prefill_s, batch * (new_tokens - 1) / decode_s


def run_hf(hf: Any, batch: int, prompt_len: int, new_tokens: int,
           device: str) -> tuple[float, float]:
    ids = torch.tensor(prompts(batch, prompt_len), device=device)

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - start

    prefill_s = run(1)
    total_s = run(new_tokens)
    return batch * prompt_len / prefill_s, batch * (new_tokens - 1) / max(total_s - prefill_s,
                                                                          1e-9)


def trace(engine: LLMEngine, batch: int, args: argparse.Namespace, label: str) -> None:
    """Print the device kernels of the prefill step and of --trace-steps decode steps."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=args.trace_steps + 2, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(batch, args.prompt_len)):
        engine.add_request(f"trace-{label}-{i}", prompt, params)
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    sort = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    for phase, steps in (("prefill", 1), ("decode", args.trace_steps)):
        with profile(activities=activities) as prof:
            for _ in range(steps):
                engine.step()
            sync(args.device)
        print(f"trace {label}, {phase}, {steps} step(s):")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.trace_rows,
                                        max_name_column_width=60))
    while engine.has_unfinished():
        engine.step()


def decode_limit(loaded: LoadedModel, batch: int, prompt_len: int, new_tokens: int,
                 elem: int, bandwidth_gbs: float) -> float:
    """Tokens/s if a decode step only streamed every weight and every sequence's KV once."""
    weights = sum(p.numel() for p in loaded.model.parameters()) * elem
    mc = loaded.config
    mean_context = prompt_len + new_tokens / 2
    kv = batch * mean_context * mc.num_layers * mc.kv_width * elem
    return batch / ((weights + kv) / (bandwidth_gbs * 1e9))


def bench_model(name: str, args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    dtype = EngineConfig(dtype=args.dtype).torch_dtype
    elem = torch.empty((), dtype=dtype).element_size()
    if name in PRESETS or name in PACKAGED_MODELS:
        loaded = load_model(name, dtype=dtype, device=args.device)
    else:
        loaded = random_shape_model(name, dtype, args.device)
    params = sum(p.numel() for p in loaded.model.parameters())
    hf = None
    if not args.no_hf and params <= args.hf_max_params:
        hf = hf_model(name, loaded, dtype, args.device)
    top = max(args.batches)
    max_len = args.prompt_len + args.decode_tokens
    block = 64 if loaded.config.mla is not None else 16
    hf_runs: dict[int, list[tuple[float, float]]] = defaultdict(list)
    rows: list[Row] = []
    profiles: dict[str, Any] = {}
    for mode in args.modes:
        start = time.perf_counter()
        engine = LLMEngine(loaded, EngineConfig(
            device=args.device, dtype=args.dtype, decode_graphs=mode, max_num_seqs=top,
            max_num_batched_tokens=top * args.prompt_len, max_model_len=max_len,
            num_blocks=top * -(-max_len // block) + 8))
        init_s = time.perf_counter() - start
        run_engine(engine, 2, 16, 4, args.device)  # warm-up
        if hf is not None and not hf_runs:
            run_hf(hf, 2, 16, 4, args.device)
        for batch in args.batches:
            profile = StepProfile(engine, args.device) if args.profile else None
            runs = []
            for i in range(args.repeat):  # best of N, interleaved with HF: the box may be shared
                runs.append(run_engine(engine, batch, args.prompt_len, args.decode_tokens,
                                       args.device, profile if i == args.repeat - 1 else None))
                if hf is not None and len(hf_runs[batch]) < args.repeat:
                    hf_runs[batch].append(
                        run_hf(hf, batch, args.prompt_len, args.decode_tokens, args.device))
            if profile is not None:
                profiles[f"{name} b{batch} {mode}"] = profile.per_step_ms()
            if args.trace_steps:
                trace(engine, batch, args, f"{name} b{batch} {mode}")
            ep, ed = (max(r[k] for r in runs) for k in (0, 1))
            hp = hd = None
            if hf_runs[batch]:
                hp, hd = (max(r[k] for r in hf_runs[batch]) for k in (0, 1))
            limit = None
            if args.bandwidth_gbs:
                limit = decode_limit(loaded, batch, args.prompt_len, args.decode_tokens, elem,
                                     args.bandwidth_gbs)
            rows.append(Row(name, batch, mode, init_s, ep, hp, ep / hp if hp else None, ed, hd,
                            ed / hd if hd else None, limit, ed / limit if limit else None))
            print(_format(rows[-1]), flush=True)
        del engine
    return rows, {"params": params, "profiles": profiles}


HEADER = ("{:<10} {:>5} {:>7} {:>6} {:>11} {:>10} {:>6} {:>10} {:>9} {:>6} {:>10} {:>6}".format(
    "model", "batch", "mode", "init s", "eng prefill", "hf prefill", "ratio", "eng decode",
    "hf decode", "ratio", "limit", "of lim"))


def _num(value: float | None, spec: str) -> str:
    return format("-", spec.split(".")[0]) if value is None else format(value, spec)


def _format(r: Row) -> str:
    return (f"{r.model:<10} {r.batch:>5} {r.mode:>7} {r.init_s:>6.1f} "
            f"{r.engine_prefill_tok_s:>11.0f} {_num(r.hf_prefill_tok_s, '>10.0f')} "
            f"{_num(r.prefill_ratio, '>6.2f')} {r.engine_decode_tok_s:>10.0f} "
            f"{_num(r.hf_decode_tok_s, '>9.0f')} {_num(r.decode_ratio, '>6.2f')} "
            f"{_num(r.limit_decode_tok_s, '>10.0f')} {_num(r.fraction_of_limit, '>6.2f')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", "--model", "--presets", nargs="+",
                        default=["tiny-llama", "tiny-mla"],
                        help=f"presets ({', '.join(PRESETS)}), real models "
                        f"({', '.join(PACKAGED_MODELS)}) or shapes ({', '.join(SHAPES)})")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--modes", nargs="+", choices=["capture", "off", "static"],
                        help="decode modes (default: capture and off on CUDA, off elsewhere)")
    parser.add_argument("--bandwidth-gbs", type=float,
                        help=f"memory bandwidth for the limit column (CUDA default {H200_GBS})")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--hf-max-params", type=float, default=math.inf,
                        help="skip HF for models with more parameters")
    parser.add_argument("--profile", action="store_true", help="host time per decode phase")
    parser.add_argument("--trace-steps", type=int, default=0,
                        help="print a torch.profiler kernel table over this many decode steps")
    parser.add_argument("--trace-rows", type=int, default=18)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs per cell")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    for name in args.models:
        if name not in PRESETS and name not in SHAPES and name not in PACKAGED_MODELS:
            parser.error(f"--models: unknown model {name!r} "
                         f"(presets {', '.join(PRESETS)}; shapes {', '.join(SHAPES)})")
    cuda = args.device.startswith("cuda")
    args.modes = args.modes or (["capture", "off"] if cuda else ["off"])
    if args.bandwidth_gbs is None and cuda:
        args.bandwidth_gbs = H200_GBS
    if args.threads:
        torch.set_num_threads(args.threads)
    print(HEADER, flush=True)
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    for name in args.models:
        model_rows, info = bench_model(name, args)
        rows += model_rows
        extra[name] = info
    print("(tokens/s; ratio = engine / HF; limit = weights + KV streamed once per step at "
          f"{args.bandwidth_gbs} GB/s)" if args.bandwidth_gbs else "(tokens/s; ratio = engine / HF)")
    for key, phases in ((k, v) for info in extra.values() for k, v in info["profiles"].items()):
        print(f"host ms per decode step, {key}: "
              + ", ".join(f"{phase} {ms:.3f}" for phase, ms in phases.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "device": args.device,
                "gpu": torch.cuda.get_device_name() if cuda else None,
                "dtype": args.dtype,
                "threads": torch.get_num_threads(),
                "prompt_len": args.prompt_len,
                "decode_tokens": args.decode_tokens,
                "repeat": args.repeat,
                "bandwidth_gbs": args.bandwidth_gbs,
                "models": extra,
                "rows": [asdict(r) for r in rows],
            }, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
