"""A first run as a newcomer meets it: ``triton-pd serve`` mistakes are one clear line (no
traceback), a busy port is found before any model loads, tritonserver's log stays hidden unless
--verbose (and never shows the CPU-only CudaDriverHelper error), --help states the defaults,
doctor checks numpy for the stub and finds nixl from its build wheel."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from backends.cli import build_parser
from backends.launch.cli import cmd_doctor
from backends.launch.install import find_triton, repo_root
from backends.launch.launcher import free_ports

pytestmark = pytest.mark.e2e


def _serve(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    http, grpc, metrics = free_ports(3)
    ports = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    env = {k: v for k, v in os.environ.items() if k != "KVBRIDGE_MASTER"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "backends.cli", "serve", *ports, *args],
                          cwd=repo_root(), env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("triton-pd serve [")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_busy_port_is_one_line_before_any_model_loads() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        http, grpc = free_ports(2)
        env = {k: v for k, v in os.environ.items() if k != "KVBRIDGE_MASTER"}
        proc = subprocess.run(
            [sys.executable, "-m", "backends.cli", "serve", "--http-port", str(http),
             "--grpc-port", str(grpc), "--metrics-port", str(port)],
            cwd=repo_root(), env=env, capture_output=True, text=True, timeout=60)
    assert _one_error_line(proc) == (
        f"triton-pd serve: --metrics-port {port}: 127.0.0.1:{port} is already in use (Address "
        "already in use); stop what holds it or choose another --metrics-port")
    assert proc.stderr.count("\n") == 1  # nothing loaded, nothing converted


@pytest.mark.parametrize(("config", "error"), [
    ("engine: {bogus: 1}\n", "{path}: engine.bogus: unknown key (expected one of ['backend', "
     "'block_size', 'dtype', 'max_model_len', 'max_num_batched_tokens', 'max_num_seqs', 'num_blocks', "
     "'threads'])"),
    ("model: /no/such/model.gguf\n", "{path}: model: '/no/such/model.gguf': no such GGUF file"),
    ("model: [\n", "{path}: not valid YAML (while parsing a flow node: expected the node content, but found '<stream end>' "
     "at line 2, column 1)"),
    (None, "{path}: No such file or directory"),
])
def test_config_mistakes_are_one_line(tmp_path: Path, config: str | None, error: str) -> None:
    path = tmp_path / "deploy.yaml"
    if config is not None:
        path.write_text(config)
    proc, _ = _serve("--config", str(path))
    assert _one_error_line(proc).startswith("triton-pd serve: " + error.format(path=path))


def test_missing_repository_is_one_line(tmp_path: Path) -> None:
    proc, _ = _serve("--model-repository", str(tmp_path / "nowhere"))
    assert _one_error_line(proc) == (f"triton-pd serve: --model-repository {tmp_path / 'nowhere'}: "
                                     "no such directory")


@pytest.mark.parametrize("verbose", [False, True])
def test_a_model_that_fails_to_load_is_named_and_the_log_shown_only_when_verbose(
        tmp_path: Path, verbose: bool) -> None:
    try:
        find_triton()
    except RuntimeError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\n')
    proc, _ = _serve("--model-repository", str(tmp_path), *(["--verbose"] if verbose else []))
    line = _one_error_line(proc)
    assert line.startswith("triton-pd serve: tritonserver exited with status 1 before it was ready: "
                           "failed to load broken: "), line
    assert "no_such_backend" in line and line.endswith("(--verbose shows the whole log)")
    assert "loading 0 worker(s) () and 1 public model(s) (broken)" in proc.stderr
    assert "CudaDriverHelper" not in proc.stdout + proc.stderr
    # tritonserver's own log (glog lines such as 'I1204 18:41:05.55 ...') only with --verbose
    assert ("failed to load 'broken'" in proc.stdout) is verbose
    assert ("server.cc" in proc.stdout) is verbose


def test_a_worker_failing_in_initialize_is_one_line_without_its_traceback(tmp_path: Path) -> None:
    try:
        find_triton()
    except RuntimeError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    config = tmp_path / "deploy.yaml"  # valid YAML the engine refuses: 2 blocks hold 32 tokens
    config.write_text("model: tiny-llama\ndisaggregation: false\n"
                      "engine: {num_blocks: 2, max_model_len: 512}\nserving: {max_tokens: 64}\n")
    proc, _ = _serve("--config", str(config))
    line = _one_error_line(proc)
    assert line.startswith("triton-pd serve: tritonserver exited with status 1 before it was "
                           "ready: failed to load worker: "), line
    assert "max_model_len=512 exceeds the KV pool (2 blocks of 16 tokens)" in line
    assert "At:" not in line and "\\n" not in line


def _help(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_help_says_what_each_option_does_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    serve = _help("serve", capsys=capsys)
    for text in ("--http-port HTTP_PORT HTTP port (default: 8000)", "(default: 8001)",
                 "(default: 8002)", "(default: 127.0.0.1)", "--verbose print tritonserver's own "
                 "log", "(default: the shipped model_repository/: smollm2-135m-instruct"):
        assert text in serve
    demo = _help("demo", capsys=capsys)
    assert "(default: 'What is the capital of France?')" in demo and "(default: 32)" in demo
    top = _help(capsys=capsys)
    assert "check this machine: tritonserver, its Python stub, numpy" in top


def test_doctor_checks_numpy_for_the_stub_and_finds_nixl(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    assert cmd_doctor(argparse.Namespace()) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"numpy {np.__version__}: ok for the Python backend stub (< 2)" in out
    if importlib.util.find_spec("nixl") is None and importlib.util.find_spec("nixl_cu12"):
        assert "nixl: importable (as nixl_cu12)" in out
    elif importlib.util.find_spec("nixl") is None:
        pytest.skip("no nixl build installed (nixl-cu12 is a test extra on linux x86_64)")
