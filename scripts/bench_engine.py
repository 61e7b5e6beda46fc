"""Engine throughput beside HF transformers generate on the same weights and machine.

For each preset and batch size: prefill tokens/s (B prompts of --prompt-len tokens, to the
first token) and decode tokens/s (the following --decode-tokens - 1 tokens of each sequence),
for the engine and for `transformers` generate (greedy, KV cache, unpadded equal-length batch),
with the engine/HF ratio. Prints a table; `--json FILE` writes the rows.

    python3 scripts/bench_engine.py [--presets tiny-llama tiny-mla] [--batches 1 8 32] [--json F]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.loader import LoadedModel, export_preset, load_model
from backends.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class Row:
    preset: str
    batch: int
    engine_prefill_tok_s: float
    hf_prefill_tok_s: float
    prefill_ratio: float
    engine_decode_tok_s: float
    hf_decode_tok_s: float
    decode_ratio: float


def prompts(batch: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(3, 259, (batch, length), generator=gen).tolist()


def bench_engine(
    loaded: LoadedModel, batch: int, prompt_len: int, new_tokens: int
) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one batch run to completion."""
    engine = LLMEngine(
        loaded, EngineConfig(max_num_seqs=max(batch, 1), max_num_batched_tokens=batch * prompt_len)
    )
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(batch, prompt_len)):
        engine.add_request(str(i), prompt, params)
    start = time.perf_counter()
    first = engine.step()  # the whole batch prefills in one step
    prefill_s = time.perf_counter() - start
    if len(first) != batch:
        raise RuntimeError(f"prefill produced {len(first)} first tokens for batch {batch}")
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    decode_s = time.perf_counter() - start
    return batch * prompt_len / prefill_s, batch * (new_tokens - 1) / decode_s


def bench_hf(
    hf: torch.nn.Module, batch: int, prompt_len: int, new_tokens: int
) -> tuple[float, float]:
    ids = torch.tensor(prompts(batch, prompt_len))

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,  # type: ignore[operator]
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - start

    prefill_s = run(1)
    total_s = run(new_tokens)
    return batch * prompt_len / prefill_s, batch * (new_tokens - 1) / max(total_s - prefill_s, 1e-9)


def bench(
    preset: str, batches: list[int], prompt_len: int, new_tokens: int, repeat: int
) -> list[Row]:
    from transformers import AutoModelForCausalLM

    loaded = load_model(preset)
    with tempfile.TemporaryDirectory() as directory:
        export_preset(preset, directory)
        hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    bench_engine(loaded, 2, 16, 4)  # warm-up
    bench_hf(hf, 2, 16, 4)
    rows = []
    for batch in batches:
        # best of `repeat` runs, interleaved: the machine may be shared and noisy
        runs = [
            (
                bench_engine(loaded, batch, prompt_len, new_tokens),
                bench_hf(hf, batch, prompt_len, new_tokens),
            )
            for _ in range(repeat)
        ]
        ep, ed = (max(r[0][k] for r in runs) for k in (0, 1))
        hp, hd = (max(r[1][k] for r in runs) for k in (0, 1))
        rows.append(Row(preset, batch, ep, hp, ep / hp, ed, hd, ed / hd))
    return rows


def print_table(rows: list[Row]) -> None:
    header = (
        "preset",
        "batch",
        "eng prefill",
        "hf prefill",
        "ratio",
        "eng decode",
        "hf decode",
        "ratio",
    )
    print("{:<11} {:>5} {:>12} {:>11} {:>6} {:>11} {:>10} {:>6}".format(*header))
    for r in rows:
        print(
            f"{r.preset:<11} {r.batch:>5} {r.engine_prefill_tok_s:>12.0f} "
            f"{r.hf_prefill_tok_s:>11.0f} {r.prefill_ratio:>6.2f} {r.engine_decode_tok_s:>11.0f} "
            f"{r.hf_decode_tok_s:>10.0f} {r.decode_ratio:>6.2f}"
        )
    print("(tokens/s; ratio = engine / HF)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-llama", "tiny-mla"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs per cell")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [
        r
        for p in args.presets
        for r in bench(p, args.batches, args.prompt_len, args.decode_tokens, args.repeat)
    ]
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": "cpu",
                    "threads": torch.get_num_threads(),
                    "prompt_len": args.prompt_len,
                    "decode_tokens": args.decode_tokens,
                    "repeat": args.repeat,
                    "rows": [asdict(r) for r in rows],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
