"""Glue between pb_utils objects and our numpy-level codecs (runs inside the Triton stub).

``pb_utils`` is passed in rather than imported so this module imports anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from backends.serving.errors import tagged_message, worker_error
from backends.serving.pb_lifetimes import CancelCheck, Keeper, requested_outputs
from backends.serving.worker_io import WorkerUpdate, failure_update, update_tensors


def request_inputs(request: Any) -> dict[str, np.ndarray]:
    """Every input tensor of a pb_utils request, by name."""
    return {t.name(): t.as_numpy() for t in request.inputs()}


def request_parameters(request: Any) -> dict[str, Any]:
    raw = request.parameters()
    if not raw:
        return {}
    data = json.loads(raw) if isinstance(raw, str) else raw
    return dict(data) if isinstance(data, Mapping) else {}


def model_parameters(args: Mapping[str, str]) -> dict[str, str]:
    """The string parameters of a model's config (from ``initialize``'s args)."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def is_decoupled(pb_utils: Any, args: Mapping[str, str]) -> bool:
    """Whether the model's config has ``model_transaction_policy { decoupled: true }``."""
    return bool(pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"])))


def model_dir(args: Mapping[str, str]) -> Path:
    """The model's directory (python-based backends get it as ``model_repository``)."""
    return Path(args["model_repository"])


def make_response(pb_utils: Any, tensors: Mapping[str, np.ndarray]) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, value) for name, value in tensors.items()])


class TritonSink:
    """A worker request's response sender, as WorkerService's ResponseSink (its response thread
    alone calls it once the request is submitted). The final ``send`` or ``fail`` hands the
    request to ``keeper``; ``is_cancelled`` asks python_backend at most every 0.5 s. ``fail``
    after data is a final update (worker_io.failure_update), before any data an error response."""

    def __init__(self, pb_utils: Any, request: Any, keeper: Keeper) -> None:
        self._pb = pb_utils
        self._request = request
        self._sender = request.get_response_sender()
        self._outputs = tuple(request.requested_output_names())
        self._keeper = keeper
        self._streamed = False  # a data response went out: a failure is then a final update
        self.is_cancelled = CancelCheck(self._sender.is_cancelled, keeper)

    def send(self, update: WorkerUpdate) -> None:
        flags = self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if update.final else 0
        tensors = requested_outputs(update_tensors(update), self._outputs)
        try:
            self._sender.send(make_response(self._pb, tensors), flags=flags)
            self._streamed = True
        finally:
            if update.final:
                self._keeper.hold(self._request, self._sender)

    def fail(self, exc: BaseException) -> None:
        if self._streamed:
            self.send(failure_update(tagged_message(exc)))
            return
        response = self._pb.InferenceResponse(output_tensors=[], error=worker_error(self._pb, exc))
        try:
            self._sender.send(response, flags=self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self._keeper.hold(self._request, self._sender)
