"""A gRPC streaming client for the public ``llm`` model (used by ``triton-pd demo`` and the bench).

One ``StreamingClient`` owns one tritonclient gRPC connection and its bidirectional stream;
requests on it run one at a time (``generate`` blocks until the final response). Every wait has
a deadline. tritonclient is imported lazily: it ships with the ``server`` extra.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

OnDelta = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class StreamResult:
    """One streamed request: the concatenated text and when each response arrived.

    ``token_times`` has one monotonic timestamp per generated token (a response carrying k
    tokens contributes k copies of its arrival time), so TTFT/TPOT come out per token.
    """

    text: str
    finish_reason: str
    num_output_tokens: int
    start_s: float
    token_times: tuple[float, ...]
    end_s: float

    @property
    def ttft_s(self) -> float:
        return (self.token_times[0] if self.token_times else self.end_s) - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s


def _input(grpcclient: Any, name: str, value: Any, datatype: str) -> Any:
    tensor = grpcclient.InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else None))
    return tensor


class StreamingClient:
    """gRPC ``stream_infer`` against ``model`` at ``url`` ("host:port"). ``close()`` is idempotent."""

    def __init__(self, url: str, model: str = "llm") -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self._model = model
        self._client = grpcclient.InferenceServerClient(url)
        self._results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._client.start_stream(callback=lambda result, error: self._results.put((result, error)))
        self._next_id = 0

    def generate(self, prompt: str, max_tokens: int, *, ignore_eos: bool = False,
                 chat: bool = False, on_delta: OnDelta | None = None,
                 timeout_s: float = 300.0) -> StreamResult:
        """Greedy streamed generation; raises RuntimeError with the server's message on error.
        ``chat``: the server applies the model's chat template (``llm`` only)."""
        g = self._grpc
        sampling = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos}
        params = json.dumps(sampling | ({"apply_chat_template": True} if chat else {}))
        inputs = [_input(g, "text_input", prompt.encode("utf-8"), "BYTES"),
                  _input(g, "stream", True, "BOOL"),
                  _input(g, "sampling_parameters", params.encode(), "BYTES"),
                  _input(g, "return_finish_reason", True, "BOOL"),
                  _input(g, "return_num_output_tokens", True, "BOOL")]
        outputs = [g.InferRequestedOutput(n) for n in ("text_output", "finish_reason", "num_output_tokens")]
        self._next_id += 1
        start = time.monotonic()
        self._client.async_stream_infer(self._model, inputs, request_id=str(self._next_id),
                                        outputs=outputs, enable_empty_final_response=True)
        return self._collect(start, on_delta, start + timeout_s)

    def _collect(self, start: float, on_delta: OnDelta | None, deadline: float) -> StreamResult:
        parts: list[str] = []
        token_times: list[float] = []
        reason = ""
        while True:
            try:
                result, error = self._results.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise RuntimeError(f"no final response within the deadline after {len(parts)} chunks") from None
            now = time.monotonic()
            if error is not None:
                raise RuntimeError(f"server error: {error}")
            text = result.as_numpy("text_output")
            if text is not None:
                delta = b"".join(text.reshape(-1)).decode("utf-8")
                parts.append(delta)
                if on_delta is not None and delta:
                    on_delta(delta)
            count = result.as_numpy("num_output_tokens")
            token_times.extend([now] * (0 if count is None else int(count.sum())))
            reason_arr = result.as_numpy("finish_reason")
            if reason_arr is not None and reason_arr.reshape(-1)[0]:
                reason = reason_arr.reshape(-1)[0].decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return StreamResult("".join(parts), reason, len(token_times), start,
                                    tuple(token_times), now)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.stop_stream()
            client.close()

    def __enter__(self) -> StreamingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
