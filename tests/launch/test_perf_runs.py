"""perf_analyzer inputs and export parsing (no server: a hand-written export in its format)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from backends.launch import perf_runs


def test_input_data_in_each_public_models_style() -> None:
    llm = perf_runs.input_data("llm", ["a"], 8)["data"][0]
    assert llm == {"text_input": ["a"], "stream": [True], "exclude_input_in_output": [True],
                   "return_num_output_tokens": [True],
                   "sampling_parameters": ['{"max_tokens": 8, "min_tokens": 8, "ignore_eos": true, "temperature": 0}']}
    assert perf_runs.input_data("ensemble", ["a", "b"], 8)["data"][1] == \
        {"text_input": ["b"], "max_tokens": [8], "min_length": [8], "stream": [True]}
    with pytest.raises(ValueError, match="api must be one of"):
        perf_runs.input_data("tensorrt_llm", ["a"], 8)


def _raw(value: int) -> str:
    """An INT32 output as perf_analyzer writes it into its JSON export: the raw bytes."""
    return struct.pack("<i", value).decode("utf-8", "surrogateescape")


def test_read_export_sums_each_requests_tokens(tmp_path: Path) -> None:
    requests = [
        {"timestamp": 2_000_000, "response_timestamps": [5_000_000, 9_000_000, 11_000_000],
         "response_outputs": [{"text_output": "x", "num_output_tokens": _raw(1)},
                              {"text_output": "yz", "num_output_tokens": _raw(200)},
                              {"text_output": "", "num_output_tokens": _raw(3)}]},
        {"timestamp": 1_000_000, "response_timestamps": [3_000_000],
         "response_outputs": [{"text_output": "w", "num_output_tokens": _raw(1)}]},
    ]
    path = tmp_path / "export.json"
    text = json.dumps({"experiments": [{"experiment": {}, "requests": requests}]}, ensure_ascii=False)
    path.write_bytes(text.encode("utf-8", "surrogateescape"))  # 200 is byte 0xC8: not UTF-8
    first, second = perf_runs.read_export(path)
    assert (first.sent_ns, first.num_output_tokens, first.text, first.ttft_ms, first.itl_ms) == \
        (1_000_000, 1, "w", 2.0, None)
    assert (second.num_output_tokens, second.text, second.ttft_ms, second.itl_ms) == (204, "xyz", 3.0, 6.0 / 203)
    summary = perf_runs.summarize([first, second])
    assert (summary.num_requests, summary.request_s, summary.output_tok_s, summary.ttft_p50_ms) == \
        (2, 200.0, 20500.0, 2.5)


def test_each_python_environment_gets_its_own_perf_analyzer_wrapper(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """The wrapper names this environment's libcudart: a virtual environment (CI's, removed
    after its run) must not overwrite the one another environment uses."""
    from backends.launch import perf_analyzer

    monkeypatch.setattr(perf_analyzer, "home", lambda: tmp_path)
    monkeypatch.setattr(perf_analyzer.sys, "prefix", str(tmp_path / "venv-a"))
    a = perf_analyzer.env_bin_dir()
    monkeypatch.setattr(perf_analyzer.sys, "prefix", str(tmp_path / "venv-b"))
    b = perf_analyzer.env_bin_dir()
    assert a != b and a.parent.parent == b.parent.parent == tmp_path / "envs"
    assert perf_analyzer.find() is None  # nothing installed for venv-b
