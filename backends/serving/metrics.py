"""Prometheus metrics through pb_utils.MetricFamily (served on tritonserver's :8002/metrics).

Families (label ``model``): pd_ttft_seconds, pd_tpot_seconds, pd_e2e_seconds (histograms),
pd_prompt_tokens_total, pd_generation_tokens_total, pd_prefix_hit_tokens_total,
pd_kv_transfer_bytes_total (counters), pd_kv_transfer_seconds (histogram) — from the
orchestrator; pd_kv_blocks_used / pd_kv_blocks_free (gauges) and pd_kv_imports_total (counter,
label ``path``: "device" when a decode read a same-GPU prefill's cache directly, "host" over the
shared-memory or tcp pool, "remote" a prompt prefix pulled from another node) — from each worker.

Cluster families (issue 13), from each worker (its kvbridge node; backends.serving.kv
ClusterStats): pd_cluster_lookups_total (label ``result``: "answered" when the master answered
a prompt's prefix lookup within the deadline, "missed" when it was late or failed),
pd_remote_prefix_hits_total (requests whose prompt prefix KV was pulled from another node),
pd_remote_pull_bytes_total (the bytes those pulls moved: whole blocks this node lacked) and
pd_remote_pull_seconds_total (their pull time), labelled ``origin``: "other_server" (a node of
another tritonserver) or "same_server" (another worker of this one). ``RequestMetrics.lookup``
counts the orchestrator's own lookups (its planning view) in pd_cluster_lookups_total.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
WORKER_POLL_S = 0.2
LOOKUPS_DOC = "prompt prefix lookups at the kvbridge master, answered within the deadline or missed"


class PolledCounter:
    """A counter family whose values a poller reads as running totals: ``update(value, total)``
    adds what ``total`` grew by since the last update of the metric labelled ``label=value``
    (made on first use). One thread updates it."""

    def __init__(self, family: Any, labels: dict[str, str], label: str) -> None:
        self.family = family
        self._labels, self._label = labels, label
        self._metrics: dict[str, Any] = {}
        self._seen: dict[str, float] = {}

    def update(self, value: str, total: float) -> None:
        if value not in self._metrics:
            self._metrics[value] = self.family.Metric(labels={**self._labels, self._label: value})
            self._seen[value] = 0.0
        if total > self._seen[value]:
            self._metrics[value].increment(float(total - self._seen[value]))
            self._seen[value] = total

    def close(self) -> None:
        """Release the metrics, then the family (see WorkerMetrics.close)."""
        self._metrics = {}
        self.family = None


class PolledGauge:
    """A gauge moved by ``increment`` (by the change since the last value), never ``set``:
    python_backend 2.51's ``Metric.set`` waits for tritonserver's answer *holding the GIL*
    (metric.cc SendSetValueRequest; increment and observe release it), so one set on a slow or
    dead parent froze the whole stub, and its exit on a dead parent hung behind it. The value
    is read once, at load."""

    def __init__(self, metric: Any) -> None:
        self.metric: Any = metric
        # Read once, at load (tritonserver answers then): a worker reloaded after its stub died
        # gets back the dead stub's metric (same family and labels) with its last value.
        self._value = float(metric.value())

    def set(self, value: float) -> None:
        if value != self._value:
            self.metric.increment(value - self._value)
            self._value = value


class WorkerMetrics:
    """KV block gauges and counters of one worker (``stats``: its WorkerStats; ``cluster``: its
    node's ClusterStats, None without one), refreshed by a small thread until ``close()`` or
    until tritonserver (the stub's parent) is gone."""

    def __init__(self, pb_utils: Any, model: str, stats: Callable[[], Any],
                 cluster: Callable[[], Any] | None = None) -> None:
        mf = pb_utils.MetricFamily
        labels = {"model": model}
        # A MetricFamily must outlive its Metrics: keep both.
        self._families: tuple[Any, ...] = (
            mf("pd_kv_blocks_used", "KV blocks in use", mf.GAUGE),
            mf("pd_kv_blocks_free", "KV blocks free", mf.GAUGE))
        self._used = PolledGauge(self._families[0].Metric(labels=labels))
        self._free = PolledGauge(self._families[1].Metric(labels=labels))

        def counter(name: str, doc: str, label: str) -> PolledCounter:
            return PolledCounter(mf(name, doc, mf.COUNTER), labels, label)

        self._imports = counter("pd_kv_imports_total", "KV imports completed, by path", "path")
        self._lookups = counter("pd_cluster_lookups_total", LOOKUPS_DOC, "result")
        self._hits = counter("pd_remote_prefix_hits_total",
                             "requests whose prompt prefix KV was pulled from another node", "origin")
        self._pull_bytes = counter("pd_remote_pull_bytes_total",
                                   "KV bytes pulled for remote prefix hits (whole blocks this node lacked)", "origin")
        self._pull_seconds = counter("pd_remote_pull_seconds_total", "time spent pulling remote prefixes", "origin")
        self._stats, self._cluster = stats, cluster
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pd-metrics", daemon=True)
        self._thread.start()

    def _counters(self) -> tuple[PolledCounter, ...]:
        return self._imports, self._lookups, self._hits, self._pull_bytes, self._pull_seconds

    def _run(self) -> None:
        parent = os.getppid()  # tritonserver
        while not self._stop.wait(WORKER_POLL_S):
            if os.getppid() != parent:
                # tritonserver died: a metric call would wait for its answer forever (an orphan
                # worker kept its pool, port and threads after tritonserver's SIGKILL)
                return
            s = self._stats()
            self._used.set(float(s.num_total_blocks - s.num_free_blocks))
            self._free.set(float(s.num_free_blocks))
            for path, count in s.kv_imports:
                self._imports.update(path, count)
            if self._cluster is not None:
                self._update_cluster(self._cluster())

    def _update_cluster(self, c: Any) -> None:
        self._lookups.update("answered", c.num_lookups_answered)
        self._lookups.update("missed", c.num_lookups_missed)
        for pulls in c.pulls:
            self._hits.update(pulls.origin, pulls.num_requests)
            self._pull_bytes.update(pulls.origin, pulls.num_bytes)
            self._pull_seconds.update(pulls.origin, pulls.elapsed_ns / 1e9)

    def close(self) -> None:
        """Stop refreshing and release the metrics, then their families, now: left to the
        interpreter's shutdown, their destructors write to the stub's shared memory after it
        is gone (the stub segfaulted in ~MetricFamily at every stop)."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        if not self._thread.is_alive():
            self._used.metric = self._free.metric = None
            for c in self._counters():
                c.close()
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
        self._families.append(mf("pd_cluster_lookups_total", LOOKUPS_DOC, mf.COUNTER))
        self.lookups = {result: self._families[-1].Metric(labels={**labels, "result": result})
                        for result in ("answered", "missed")}

    def close(self) -> None:
        """Release the metrics, then their families, while the stub is still connected (see
        WorkerMetrics.close); no observe() after this."""
        for name in ("ttft", "tpot", "e2e", "kv_seconds", "prompt_tokens", "generation_tokens",
                     "prefix_hits", "kv_bytes"):
            setattr(self, name, None)
        self.lookups = {}
        self._families = []

    def lookup(self, answered: bool) -> None:
        """Count one planning lookup of the cluster view: answered within the deadline, or not."""
        self.lookups["answered" if answered else "missed"].increment(1.0)

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
