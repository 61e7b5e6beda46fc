"""The front door's side of tritonserver: ``llm`` over gRPC ``ModelStreamInfer``.

One ``TritonLlm`` per front door owns one ``tritonclient.grpc.aio`` client, that is one gRPC
channel (one HTTP/2 connection); each request is its own stream on it. It lives on the event
loop that created it. A request whose consumer stops early (the HTTP client went away, or an
error) has its gRPC call cancelled, and tritonserver cancels the request in ``llm``, which
frees its workers' KV blocks. Every wait has a deadline: the connect timeout at start-up and
``request_timeout_s`` (the gRPC deadline) per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.openai_api.protocol import LlmRequest, ServedModel

_OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")


class LlmFailed(Exception):
    """``llm`` answered with an error (its message), or the stream ended without a final one."""


@dataclass(frozen=True, slots=True)
class LlmEvent:
    """One ``llm`` response: a text delta; ``finish_reason`` is "" except on the last one."""

    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int  # tokens in this response


def _first(result: Any, name: str) -> Any:
    array = result.as_numpy(name)
    return None if array is None or array.size == 0 else array.reshape(-1)[0]


def _event(result: Any) -> LlmEvent:
    text = result.as_numpy("text_output")
    reason = _first(result, "finish_reason")
    return LlmEvent(b"".join(text.reshape(-1)).decode("utf-8") if text is not None else "",
                    reason.decode() if reason else "",
                    int(_first(result, "num_input_tokens") or 0),
                    int(_first(result, "num_output_tokens") or 0))


class TritonLlm:
    """The gRPC client of one Triton model with vllm_backend's ``llm`` tensors."""

    def __init__(self, client: Any, served: ServedModel, decoupled: bool,
                 request_timeout_s: float) -> None:
        self._client = client
        self.served = served
        self._decoupled = decoupled  # False: llm refuses stream=true; one response per request
        self._timeout_s = request_timeout_s

    @classmethod
    async def connect(cls, url: str, model: str, connect_timeout_s: float,
                      request_timeout_s: float) -> TritonLlm:
        """Waits up to ``connect_timeout_s`` for ``model`` to be ready at ``url`` and reads its
        config; ConnectionError (one line) when it is not."""
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(url)
        deadline = time.monotonic() + connect_timeout_s
        last = "not ready"
        while True:
            try:
                if await client.is_model_ready(model):
                    config = (await client.get_model_config(model, as_json=True))["config"]
                    break
            except InferenceServerException as exc:
                last = str(exc.message()).splitlines()[0]
            if time.monotonic() >= deadline:
                await client.close()
                raise ConnectionError(f"model {model!r} at {url} is not ready after "
                                      f"{connect_timeout_s:g} s ({last})")
            await asyncio.sleep(0.5)
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        served = ServedModel(model, int(params.get("max_tokens") or 1024), int(time.time()))
        decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        return cls(client, served, decoupled, request_timeout_s)

    def _inputs(self, req: LlmRequest) -> list[Any]:
        import tritonclient.grpc.aio as grpcclient

        values = {"text_input": np.array([req.text_input.encode()], dtype=np.object_),
                  "sampling_parameters": np.array([req.sampling_parameters.encode()], dtype=np.object_),
                  "stream": np.array([self._decoupled]),
                  "exclude_input_in_output": np.array([True]),
                  "return_finish_reason": np.array([True]),
                  "return_num_input_tokens": np.array([True]),
                  "return_num_output_tokens": np.array([True])}
        inputs = []
        for name, value in values.items():
            tensor = grpcclient.InferInput(name, [1], "BOOL" if value.dtype == np.bool_ else "BYTES")
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return inputs

    async def generate(self, req: LlmRequest, request_id: str) -> AsyncGenerator[LlmEvent, None]:
        """``llm``'s responses to ``req``, up to the one with a finish reason; LlmFailed with
        llm's message on an error. Closing the iterator early cancels the request in Triton."""
        import grpc
        import tritonclient.grpc.aio as grpcclient

        finished = asyncio.Event()
        outputs = [grpcclient.InferRequestedOutput(n) for n in _OUTPUTS]
        request = {"model_name": self.served.name, "inputs": self._inputs(req),
                   "outputs": outputs, "request_id": request_id}

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield request
            await finished.wait()  # keeps our side of the stream open until the last response

        call = self._client.stream_infer(one_request(), stream_timeout=self._timeout_s)
        done = False
        try:
            async for result, error in call:
                if error is not None:
                    done = True  # Triton has ended this request
                    raise LlmFailed(str(error.message()))
                event = _event(result)
                done = bool(event.finish_reason)
                yield event
                if done:
                    return
            raise LlmFailed("tritonserver ended the stream before the final response")
        except grpc.RpcError as exc:  # deadline, connection lost: the call is over
            done = True
            raise LlmFailed(f"tritonserver: {exc.code().name}: {exc.details()}") from None
        finally:
            finished.set()
            if not done:
                call.cancel()

    async def close(self) -> None:
        await self._client.close()
