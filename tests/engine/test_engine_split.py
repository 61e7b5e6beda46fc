"""Prefill in one engine, decode in another OS process: the same tokens as one engine.

The KV travels as a file (safetensors, one tensor per layer, the KVExport layout).
"""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

from conftest import PRESETS, LoadedFn, make_prompt
from safetensors.torch import save_file
from split_worker import decode_jobs

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampling_params import SamplingParams

CASES = {
    "greedy": {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True},
    "seeded": {"max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 11, "ignore_eos": True},
}
LENGTHS = {"tiny-llama": 37, "tiny-mla": 70}


def test_prefill_here_decode_in_another_process(loaded: LoadedFn, tmp_path: Path) -> None:
    expected: dict[str, list[int]] = {}
    expected_cached: dict[str, int] = {}
    for preset in PRESETS:
        prefill = LLMEngine(loaded(preset), EngineConfig())
        whole = LLMEngine(loaded(preset), EngineConfig())
        prompt = make_prompt(5, LENGTHS[preset])
        for case, raw in CASES.items():
            params = SamplingParams(**raw)  # type: ignore[arg-type]
            rid = f"job-{preset}-{case}"
            prefill.add_request(rid, prompt, params, prefill_only=True)
            outs = []
            while prefill.has_unfinished():
                outs += prefill.step()
            assert [(o.finished, o.finish_reason, o.num_output_tokens) for o in outs] == [
                (True, None, 1)
            ]
            export = prefill.export_kv(rid)
            assert export.num_tokens == len(prompt)
            layers = {f"layer{i}": export.layer(i) for i in range(export.layout.num_layers)}
            save_file(layers, str(tmp_path / f"{rid}.safetensors"))
            job = {
                "preset": preset,
                "prompt": prompt,
                "params": raw,
                "num_tokens": export.num_tokens,
                "prior_output_ids": list(outs[0].new_token_ids),
            }
            (tmp_path / f"{rid}.json").write_text(json.dumps(job))
            prefill.release_kv(rid)
            expected_cached[rid] = len(prompt)
            expected[rid] = list(whole.generate([prompt], params)[0].output_token_ids)
        prefill.block_manager.check_integrity()
        assert prefill.block_manager.num_free_blocks == prefill.block_manager.num_total_blocks
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=decode_jobs, args=(str(tmp_path), child))
    proc.start()
    child.close()
    got = {}
    cached = {}
    for _ in expected:
        name, tokens, num_cached = parent.recv()
        got[name] = tokens
        cached[name] = num_cached
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert got == expected
    assert cached == expected_cached
