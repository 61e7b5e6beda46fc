"""TritonSink: how a worker request's failure reaches python_backend's response sender.

The sender and pb_utils here are recorders of what TritonSink hands python_backend (the only
place the real ones run is the Triton stub; tests/e2e covers that path end to end).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backends.serving.errors import RequestCancelled, split_worker_message
from backends.serving.pb_lifetimes import Keeper
from backends.serving.specs import WORKER_OUTPUTS
from backends.serving.triton_io import TritonSink
from backends.serving.worker_io import WorkerUpdate, parse_update

FINAL = 1


class _Tensor:
    def __init__(self, name: str, value: np.ndarray) -> None:
        self.name, self.value = name, value


class _Response:
    def __init__(self, output_tensors: list[_Tensor], error: Any = None) -> None:
        self.tensors = {t.name: t.value for t in output_tensors}
        self.error = error


class _Error:
    INVALID_ARG, CANCELLED, UNAVAILABLE, INTERNAL = range(4)

    def __init__(self, message: str, code: int) -> None:
        self.message, self.code = message, code


class _PbUtils:
    Tensor = _Tensor
    InferenceResponse = _Response
    TritonError = _Error
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL


class _Request:
    def __init__(self) -> None:
        self.sent: list[tuple[_Response, int]] = []

    def get_response_sender(self) -> _Request:
        return self

    def requested_output_names(self) -> list[str]:
        return [t.name for t in WORKER_OUTPUTS]

    def send(self, response: _Response, flags: int = 0) -> None:
        self.sent.append((response, flags))

    def is_cancelled(self) -> bool:
        return False


def _sink() -> tuple[TritonSink, _Request, Keeper]:
    request, keeper = _Request(), Keeper()
    return TritonSink(_PbUtils(), request, keeper), request, keeper


def test_a_failure_after_data_is_a_final_update_carrying_the_error() -> None:
    sink, request, keeper = _sink()
    sink.send(WorkerUpdate((7,), (), False, "", 3, 1, 0))
    sink.fail(RequestCancelled("request cancelled"))
    (data, data_flags), (end, end_flags) = request.sent
    assert data_flags == 0 and end_flags == FINAL
    assert end.error is None
    update = parse_update(end.tensors)
    assert update.final and update.finish_reason == "error" and update.new_token_ids == ()
    assert split_worker_message(update.error, "INTERNAL") == ("request cancelled", "CANCELLED")
    assert len(keeper) >= 1  # the request went to the keeper with its final response


def test_a_failure_before_data_is_an_error_response() -> None:
    sink, request, _ = _sink()
    sink.fail(ValueError("input_ids: required and must not be empty"))
    ((response, flags),) = request.sent
    assert flags == FINAL and response.tensors == {}
    assert response.error.code == _Error.INVALID_ARG
    assert response.error.message == "[INVALID_ARG] input_ids: required and must not be empty"
