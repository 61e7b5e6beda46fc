"""Concurrent gRPC streams against ``llm`` with client cancels: the load behind
``scripts/stress_cancels.py`` and the e2e cancel-under-load test (runs outside tritonserver).

``num_streams`` threads each run a closed loop until ``duration_s`` has passed (or, when
``requests_per_stream`` is set, until they have sent that many): open a gRPC stream, send one
greedy streamed request (``ignore_eos``, ``max_tokens``), read it to its final response, close
the stream. A seeded plan decides, per request, whether the client cancels it
(``stop_stream(cancel_requests=True)``, what a chat UI's "stop" or a closed tab does) and after
how many chunks (1..``max_cancel_chunks``); the same seed gives the same plan. A request planned
for a cancel that ends before its chunk count is a completed one. Every request ends as exactly
one Outcome: completed (final response), cancelled (by the plan), error (the server's error
message) or hung (no final response within ``request_timeout_s``; its stream is then cancelled).
tritonclient is imported lazily: it ships with the ``server`` extra.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import random
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

OutcomeKind = Literal["completed", "cancelled", "error", "hung"]


@dataclass(frozen=True, slots=True)
class LoadConfig:
    prompts: tuple[str, ...]
    num_streams: int = 64
    cancel_fraction: float = 0.2
    max_cancel_chunks: int = 12
    max_tokens: int = 48
    duration_s: float = 60.0
    request_timeout_s: float = 60.0
    seed: int = 0
    model: str = "llm"
    requests_per_stream: int | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("prompts: at least one prompt is required")
        if self.num_streams < 1:
            raise ValueError(f"num_streams must be at least 1, got {self.num_streams}")
        if not 0.0 <= self.cancel_fraction <= 1.0:
            raise ValueError(f"cancel_fraction must be in [0, 1], got {self.cancel_fraction}")
        if self.max_cancel_chunks < 1:
            raise ValueError(f"max_cancel_chunks must be at least 1, got {self.max_cancel_chunks}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.requests_per_stream is not None and self.requests_per_stream < 1:
            raise ValueError(f"requests_per_stream must be at least 1, got {self.requests_per_stream}")


@dataclass(frozen=True, slots=True)
class Planned:
    """One request of the plan: its prompt and, for a cancel, after how many chunks."""

    prompt: str
    cancel_after_chunks: int | None


@dataclass(frozen=True, slots=True)
class Outcome:
    stream: int
    index: int
    planned: Planned
    kind: OutcomeKind
    text: str
    num_chunks: int
    start_s: float  # since the load started
    elapsed_s: float
    error: str = ""


@dataclass(frozen=True, slots=True)
class LoadReport:
    config: LoadConfig
    outcomes: tuple[Outcome, ...]
    wall_s: float

    def counts(self) -> dict[str, int]:
        found = Counter(o.kind for o in self.outcomes)
        return {kind: found.get(kind, 0) for kind in ("completed", "cancelled", "error", "hung")}

    def first_failure_s(self) -> float | None:
        """When the first request that errored or hung started (seconds into the load)."""
        return min((o.start_s for o in self.outcomes if o.kind in ("error", "hung")), default=None)

    def errors(self) -> list[str]:
        """Distinct error messages (hung requests included), most frequent first."""
        found = Counter(o.error for o in self.outcomes if o.kind in ("error", "hung"))
        return [f"{n}x {message}" for message, n in found.most_common()]


def plan_request(config: LoadConfig, stream: int, index: int) -> Planned:
    """Request ``index`` of ``stream``: a pure function of the seed (reruns cancel the same ones)."""
    rng = random.Random(f"{config.seed}:{stream}:{index}")
    prompt = rng.choice(config.prompts)
    cancel = rng.random() < config.cancel_fraction
    return Planned(prompt, rng.randint(1, config.max_cancel_chunks) if cancel else None)


def _inputs(grpcclient: Any, prompt: str, max_tokens: int) -> list[Any]:
    params = json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    values = [("text_input", prompt.encode(), "BYTES"), ("stream", True, "BOOL"),
              ("sampling_parameters", params.encode(), "BYTES")]
    tensors = []
    for name, value, datatype in values:
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else None))
        tensors.append(tensor)
    return tensors


def end_request_iterator(client: Any) -> None:
    """Ends the request iterator of ``client``'s open stream (tritonclient 2.48 internals:
    ``_InferStream._request_queue``; its own close skips this when it cancels)."""
    stream = getattr(client, "_stream", None)
    requests = getattr(stream, "_request_queue", None)
    if requests is not None:
        requests.put(None)


class _Stream:
    """One client thread's gRPC connection; one stream per request."""

    def __init__(self, url: str, config: LoadConfig, stream: int, load_start: float) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self._config = config
        self._stream = stream
        self._load_start = load_start
        self._client = grpcclient.InferenceServerClient(url)

    def run_one(self, index: int, planned: Planned) -> Outcome:
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        start = time.monotonic()
        self._client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            kind, text, chunks, error = self._read(results, planned, start)
        finally:
            # Cancelling (planned, or a hung request) closes the stream at once; otherwise the
            # final response already came and closing waits for nothing. The request iterator
            # is ended first: tritonclient 2.48's stop_stream(cancel_requests=True) cancels the
            # call but never ends the iterator that feeds it, so gRPC's thread reading it waits
            # forever: one leaked thread per request (7,000 after ten minutes at 128 streams,
            # when the client could no longer keep its streams going and reported the slowest
            # requests as hung although the server was idle).
            end_request_iterator(self._client)
            self._client.stop_stream(cancel_requests=True)
        return Outcome(self._stream, index, planned, kind, text, chunks, start - self._load_start,
                       time.monotonic() - start, error)

    def _read(self, results: queue.Queue[tuple[Any, Any]], planned: Planned,
              start: float) -> tuple[OutcomeKind, str, int, str]:
        self._client.async_stream_infer(
            self._config.model, _inputs(self._grpc, planned.prompt, self._config.max_tokens),
            request_id=f"{self._stream}", enable_empty_final_response=True,
            outputs=[self._grpc.InferRequestedOutput("text_output")])
        deadline = start + self._config.request_timeout_s
        parts: list[str] = []
        while True:
            try:
                result, error = results.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return "hung", "".join(parts), len(parts), \
                    f"no final response within {self._config.request_timeout_s:.0f}s"
            if error is not None:
                return "error", "".join(parts), len(parts), str(error)
            text = result.as_numpy("text_output")
            if text is not None:
                parts.append(b"".join(text.reshape(-1)).decode("utf-8"))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return "completed", "".join(parts), len(parts), ""
            if planned.cancel_after_chunks is not None and len(parts) >= planned.cancel_after_chunks:
                return "cancelled", "".join(parts), len(parts), ""

    def close(self) -> None:
        self._client.close()


def _client_loop(url: str, config: LoadConfig, stream: int, start: float, out: list[Outcome],
                 lock: threading.Lock) -> None:
    client = _Stream(url, config, stream, start)
    stop_at = start + config.duration_s
    try:
        index = 0
        limit = config.requests_per_stream
        while time.monotonic() < stop_at and (limit is None or index < limit):
            outcome = client.run_one(index, plan_request(config, stream, index))
            with lock:
                out.append(outcome)
            index += 1
    finally:
        client.close()


def run_load(url: str, config: LoadConfig) -> LoadReport:
    """Runs the load against the gRPC endpoint ``url`` ("host:port"); returns every request's
    outcome. Each thread finishes the request it is on when ``duration_s`` ends, so the call
    returns within ``duration_s + request_timeout_s`` (plus stream start-up)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = time.monotonic()
    threads = [threading.Thread(target=_client_loop, name=f"stress-{i}", daemon=True,
                                args=(url, config, i, start, outcomes, lock))
               for i in range(config.num_streams)]
    for thread in threads:
        thread.start()
    deadline = start + config.duration_s + config.request_timeout_s + 30.0
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    with lock:
        done = tuple(sorted(outcomes, key=lambda o: (o.stream, o.index)))
    return LoadReport(config, done, time.monotonic() - start)


def run_load_in_child(url: str, config: LoadConfig) -> LoadReport:
    """``run_load`` in a spawned child process. The caller may host the kvbridge master (as
    ``triton-pd serve`` and the e2e fixtures do): sharing the GIL with the client threads, its
    thread can fall behind and drop the workers as silent."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(run_load, url, config).result()
