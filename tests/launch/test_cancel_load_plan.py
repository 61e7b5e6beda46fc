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
