"""Running perf_analyzer and genai-perf against ``llm`` and ``ensemble``, and reading their results.

perf_analyzer gets ``--input-data`` JSON in each public model's style: vLLM's for ``llm``
(1-D tensors; ``sampling_parameters`` JSON with max_tokens, min_tokens and ignore_eos) and
TensorRT-LLM's for ``ensemble`` (``--shape text_input:1`` etc.; max_tokens and min_length, INT32,
so every request streams exactly ``output_len`` tokens; no FP32 input, which perf_analyzer's JSON
export cannot write). Both ask for gRPC streaming (decoupled models). ``read_export`` turns
perf_analyzer's ``--profile-export-file`` into per-request facts, with the tokens each request's
responses carried (their ``num_output_tokens``: perf_analyzer writes non-string outputs as their
raw little-endian bytes). genai-perf runs ``--service-kind triton --backend vllm|tensorrtllm``
with a local tokenizer and writes its own summary (``profile_export_genai_perf.json``).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

APIS = ("llm", "ensemble")


def input_data(api: str, prompts: Sequence[str], output_len: int) -> dict[str, list[dict[str, list[object]]]]:
    """perf_analyzer ``--input-data`` for ``api``: one entry per prompt, ``output_len`` tokens each."""
    if api == "llm":
        params = json.dumps({"max_tokens": output_len, "min_tokens": output_len, "ignore_eos": True,
                             "temperature": 0})
        return {"data": [{"text_input": [p], "stream": [True], "sampling_parameters": [params],
                          "exclude_input_in_output": [True], "return_num_output_tokens": [True]}
                         for p in prompts]}
    if api == "ensemble":
        return {"data": [{"text_input": [p], "max_tokens": [output_len], "min_length": [output_len],
                          "stream": [True]} for p in prompts]}
    raise ValueError(f"api must be one of {APIS}, got {api!r}")


def perf_analyzer_args(api: str, grpc_url: str, data_file: Path, export_file: Path, concurrency: int,
                       num_requests: int) -> list[str]:
    """perf_analyzer's arguments (after the binary) for ``num_requests`` requests at ``concurrency``."""
    args = ["-m", api, "-u", grpc_url, "-i", "grpc", "--streaming", "--async", "--input-data", str(data_file),
            "--concurrency-range", str(concurrency), "--request-count", str(num_requests),
            "--profile-export-file", str(export_file)]
    if api == "ensemble":
        args += ["--shape", "text_input:1", "--shape", "max_tokens:1", "--shape", "min_length:1",
                 "--shape", "stream:1"]
    return args


def genai_perf_args(api: str, grpc_url: str, tokenizer: Path, artifact_dir: Path, concurrency: int,
                    num_requests: int, prompt_len: int, output_len: int) -> list[str]:
    """``genai-perf profile`` arguments: synthetic prompts of ``prompt_len`` tokens, exactly
    ``output_len`` output tokens, ``num_requests`` requests (passed through to perf_analyzer)."""
    backend = {"llm": "vllm", "ensemble": "tensorrtllm"}[api]
    return ["profile", "-m", api, "--service-kind", "triton", "--backend", backend, "--streaming",
            "-u", grpc_url, "--tokenizer", str(tokenizer),
            "--synthetic-input-tokens-mean", str(prompt_len), "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(output_len), "--output-tokens-mean-deterministic",
            "--concurrency", str(concurrency), "--num-prompts", str(max(num_requests, 1)),
            "--random-seed", "0", "--artifact-dir", str(artifact_dir), "--", "--request-count", str(num_requests)]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request in perf_analyzer's export: when it was sent and when each response came (ns)."""

    sent_ns: int
    response_ns: tuple[int, ...]
    num_output_tokens: int  # summed over the responses' num_output_tokens
    text: str

    @property
    def ttft_ms(self) -> float:
        return (self.response_ns[0] - self.sent_ns) / 1e6

    @property
    def itl_ms(self) -> float | None:
        """Mean time between output tokens after the first response (None with one token)."""
        if self.num_output_tokens < 2:
            return None
        return (self.response_ns[-1] - self.response_ns[0]) / 1e6 / (self.num_output_tokens - 1)


def _raw_int(value: str) -> int:
    """An integer output as perf_analyzer exports it: its raw little-endian bytes in a string."""
    return int.from_bytes(value.encode("utf-8", "surrogateescape"), "little") if value else 0


def read_export(path: Path) -> list[RequestRecord]:
    """The requests of a perf_analyzer ``--profile-export-file`` (one experiment), in send order."""
    data = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    [experiment] = data["experiments"]
    records = []
    for r in experiment["requests"]:
        outputs = r["response_outputs"]
        records.append(RequestRecord(
            int(r["timestamp"]), tuple(int(t) for t in r["response_timestamps"]),
            sum(_raw_int(o.get("num_output_tokens", "")) for o in outputs),
            "".join(o.get("text_output", "") for o in outputs)))
    return sorted(records, key=lambda rec: rec.sent_ns)


@dataclass(frozen=True, slots=True)
class Summary:
    """A run's client-side numbers: requests/s and output tokens/s over the run's span (first
    send to last response); TTFT and inter-token latency (ms) p50 / p99 over requests."""

    num_requests: int
    request_s: float
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(records: Sequence[RequestRecord]) -> Summary:
    if not records or any(not r.response_ns for r in records):
        raise ValueError(f"summarize: every request needs a response ({len(records)} requests)")
    span_s = (max(r.response_ns[-1] for r in records) - min(r.sent_ns for r in records)) / 1e9
    ttft = [r.ttft_ms for r in records]
    itl = [v for r in records if (v := r.itl_ms) is not None]
    return Summary(len(records), len(records) / span_s, sum(r.num_output_tokens for r in records) / span_s,
                   statistics.median(ttft), _pct(ttft, 0.99), _pct(itl, 0.5), _pct(itl, 0.99))


def read_genai_perf(artifact_dir: Path) -> Summary:
    """genai-perf's own summary (``profile_export_genai_perf.json``) as a Summary; its request
    count is that of perf_analyzer's export beside it."""
    stats = json.loads((artifact_dir / "profile_export_genai_perf.json").read_text())
    num_requests = len(read_export(artifact_dir / "profile_export.json"))
    return Summary(num_requests, stats["request_throughput"]["avg"], stats["output_token_throughput"]["avg"],
                   stats["time_to_first_token"]["p50"], stats["time_to_first_token"]["p99"],
                   stats["inter_token_latency"]["p50"], stats["inter_token_latency"]["p99"])
