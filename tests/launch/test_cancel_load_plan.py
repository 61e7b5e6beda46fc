"""The cancel-load plan (backends/launch/cancel_load.py): a pure function of the seed, with the
configured share of cancels and chunk counts in range; bad settings name the field."""

from __future__ import annotations

import pytest

from backends.launch.cancel_load import LoadConfig, plan_request

PROMPTS = ("a", "b", "c")


def test_plan_is_a_function_of_the_seed() -> None:
    config = LoadConfig(PROMPTS, num_streams=4, seed=3)
    first = [plan_request(config, s, i) for s in range(4) for i in range(50)]
    assert first == [plan_request(config, s, i) for s in range(4) for i in range(50)]
    other = LoadConfig(PROMPTS, num_streams=4, seed=4)
    assert first != [plan_request(other, s, i) for s in range(4) for i in range(50)]


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (1.0, 2000)])
def test_plan_cancels_the_configured_share(fraction: float, expected: int) -> None:
    config = LoadConfig(PROMPTS, num_streams=20, cancel_fraction=fraction, max_cancel_chunks=5)
    plans = [plan_request(config, s, i) for s in range(20) for i in range(100)]
    cancels = [p.cancel_after_chunks for p in plans if p.cancel_after_chunks is not None]
    assert len(cancels) == expected
    assert set(cancels) <= {1, 2, 3, 4, 5}
    assert {p.prompt for p in plans} == set(PROMPTS)


def test_plan_share_is_near_the_fraction() -> None:
    config = LoadConfig(PROMPTS, num_streams=64, cancel_fraction=0.2, max_cancel_chunks=12)
    plans = [plan_request(config, s, i) for s in range(64) for i in range(50)]
    cancels = [p.cancel_after_chunks for p in plans if p.cancel_after_chunks is not None]
    assert 0.17 < len(cancels) / len(plans) < 0.23
    assert set(cancels) == set(range(1, 13))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompts": ()}, "prompts: at least one prompt is required"),
    ({"num_streams": 0}, "num_streams must be at least 1, got 0"),
    ({"cancel_fraction": 1.5}, r"cancel_fraction must be in \[0, 1\], got 1.5"),
    ({"max_cancel_chunks": 0}, "max_cancel_chunks must be at least 1, got 0"),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
    ({"requests_per_stream": 0}, "requests_per_stream must be at least 1, got 0"),
])
def test_bad_config_names_the_field(kwargs: dict, message: str) -> None:
    args = {"prompts": PROMPTS, **kwargs}
    with pytest.raises(ValueError, match=f"^{message}$"):
        LoadConfig(**args)


def _streams_left_behind(end_iterator: bool, count: int = 5) -> int:
    """Threads left after ``count`` cancelled streams of one real tritonclient client (to a
    closed port: each call fails at once, as a cancelled one ends)."""
    import socket
    import threading
    import time

    import tritonclient.grpc as grpcclient

    from backends.launch.cancel_load import end_request_iterator

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    before = threading.active_count()
    streams = []
    for _ in range(count):
        client.start_stream(callback=lambda result, error: None)
        streams.append(client._stream)  # to end the leaked iterators afterwards
        if end_iterator:
            end_request_iterator(client)
        client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    left = threading.active_count() - before
    for stream in streams:  # no thread of this test outlives it
        stream._request_queue.put(None)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    client.close()
    return left


def test_cancelled_streams_leave_no_thread_behind() -> None:
    """tritonclient 2.48's stop_stream(cancel_requests=True) leaves gRPC's request-iterator
    thread waiting forever (the harness leaked one per request: 7,000 threads after ten minutes
    at 128 streams); end_request_iterator ends it."""
    assert _streams_left_behind(end_iterator=False) == 5  # the leak, as tritonclient has it
    assert _streams_left_behind(end_iterator=True) == 0
