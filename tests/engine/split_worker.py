"""Child-process side of test_engine_split: a decode engine importing KV from a file."""

from __future__ import annotations

import json
from multiprocessing.connection import Connection
from pathlib import Path

from safetensors.torch import load_file

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.kv_transfer import TensorKVSource
from backends.engine.sampling_params import SamplingParams


def decode_jobs(job_dir: str, conn: Connection) -> None:
    """For each job-*.json in `job_dir`: import its KV, decode, send (job name, output ids)."""
    engines: dict[str, LLMEngine] = {}
    for job_file in sorted(Path(job_dir).glob("job-*.json")):
        job = json.loads(job_file.read_text())
        preset = job["preset"]
        if preset not in engines:
            engines[preset] = LLMEngine(preset, EngineConfig())
        engine = engines[preset]
        tensors = load_file(str(job_file.with_suffix(".safetensors")))
        layers = [tensors[f"layer{i}"] for i in range(len(tensors))]
        params = SamplingParams(**job["params"])
        source = TensorKVSource(job["num_tokens"], layers)
        engine.add_request(
            job_file.stem,
            job["prompt"],
            params,
            kv_source=source,
            prior_output_ids=job["prior_output_ids"],
        )
        tokens = list(job["prior_output_ids"])
        cached = -1
        while engine.has_unfinished():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
                cached = out.num_cached_tokens
        engine.block_manager.check_integrity()
        conn.send((job_file.stem, tokens, cached))
    conn.close()
