"""Prometheus metrics through pb_utils.MetricFamily (served on tritonserver's :8002/metrics).

Families (label ``model``): pd_ttft_seconds, pd_tpot_seconds, pd_e2e_seconds (histograms),
pd_prompt_tokens_total, pd_generation_tokens_total, pd_prefix_hit_tokens_total,
pd_kv_transfer_bytes_total (counters), pd_kv_transfer_seconds (histogram) — from the
orchestrator; pd_kv_blocks_used / pd_kv_blocks_free (gauges) and pd_kv_imports_total (counter,
label ``path``: "device" when a decode read a same-GPU prefill's cache directly, "host" over the
shared-memory or tcp pool, "remote" a prompt prefix pulled from another node) — from each worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
WORKER_POLL_S = 0.2


class WorkerMetrics:
    """KV block gauges of one worker, refreshed by a small thread until ``close()``."""

    def __init__(self, pb_utils: Any, model: str, stats: Callable[[], Any]) -> None:
        mf = pb_utils.MetricFamily
        labels = {"model": model}
        # A MetricFamily must outlive its Metrics: keep both.
        self._families: tuple[Any, ...] = (
            mf("pd_kv_blocks_used", "KV blocks in use", mf.GAUGE),
            mf("pd_kv_blocks_free", "KV blocks free", mf.GAUGE),
            mf("pd_kv_imports_total", "KV imports completed, by path", mf.COUNTER))
        self._used = self._families[0].Metric(labels=labels)
        self._free = self._families[1].Metric(labels=labels)
        self._imports: dict[str, Any] = {}  # path -> Metric, made on first use
        self._imported: dict[str, int] = {}
        self._labels = labels
        self._stats = stats
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pd-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(WORKER_POLL_S):
            s = self._stats()
            self._used.set(float(s.num_total_blocks - s.num_free_blocks))
            self._free.set(float(s.num_free_blocks))
            for path, count in s.kv_imports:
                if path not in self._imports:
                    self._imports[path] = self._families[2].Metric(labels={**self._labels, "path": path})
                    self._imported[path] = 0
                if count > self._imported[path]:
                    self._imports[path].increment(float(count - self._imported[path]))
                    self._imported[path] = count

    def close(self) -> None:
        """Stop refreshing and release the metrics, then their families, now: left to the
        interpreter's shutdown, their destructors write to the stub's shared memory after it
        is gone (the stub segfaulted in ~MetricFamily at every stop)."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        if not self._thread.is_alive():
            self._used = self._free = None
            self._imports = {}
            self._families = ()


class RequestMetrics:
    """The orchestrator's per-request latency and token metrics."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        mf = pb_utils.MetricFamily
        labels = {"model": model}
        self._families: list[Any] = []  # a MetricFamily must outlive its Metrics

        def hist(name: str, doc: str) -> Any:
            self._families.append(mf(name, doc, mf.HISTOGRAM))
            return self._families[-1].Metric(labels=labels, buckets=LATENCY_BUCKETS)

        def counter(name: str, doc: str) -> Any:
            self._families.append(mf(name, doc, mf.COUNTER))
            return self._families[-1].Metric(labels=labels)

        self.ttft = hist("pd_ttft_seconds", "time to first token")
        self.tpot = hist("pd_tpot_seconds", "time per output token after the first")
        self.e2e = hist("pd_e2e_seconds", "request latency, arrival to last token")
        self.kv_seconds = hist("pd_kv_transfer_seconds", "KV hand-off time per request")
        self.prompt_tokens = counter("pd_prompt_tokens_total", "prompt tokens")
        self.generation_tokens = counter("pd_generation_tokens_total", "generated tokens")
        self.prefix_hits = counter("pd_prefix_hit_tokens_total", "prompt tokens served from cache")
        self.kv_bytes = counter("pd_kv_transfer_bytes_total", "KV bytes pulled from another node (the blocks this one lacked)")

    def close(self) -> None:
        """Release the metrics, then their families, while the stub is still connected (see
        WorkerMetrics.close); no observe() after this."""
        for name in ("ttft", "tpot", "e2e", "kv_seconds", "prompt_tokens", "generation_tokens",
                     "prefix_hits", "kv_bytes"):
            setattr(self, name, None)
        self._families = []

    def observe(self, timing: Any) -> None:
        """Record one finished request (a backends.serving.orchestrator.Timing)."""
        if timing.first_token_ns:
            self.ttft.observe((timing.first_token_ns - timing.arrival_ns) / 1e9)
        if timing.num_output_tokens > 1:
            self.tpot.observe((timing.last_token_ns - timing.first_token_ns)
                              / 1e9 / (timing.num_output_tokens - 1))
        self.e2e.observe((timing.last_token_ns - timing.arrival_ns) / 1e9)
        self.prompt_tokens.increment(timing.num_prompt_tokens)
        self.generation_tokens.increment(timing.num_output_tokens)
        self.prefix_hits.increment(timing.num_cached_tokens)
        if timing.kv_transfer_bytes:
            self.kv_bytes.increment(timing.kv_transfer_bytes)
            self.kv_seconds.observe(timing.kv_transfer_ns / 1e9)
