#!/usr/bin/env bash
# Installs triton-pd with its test and server extras and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e ".[test,server]"
python3 -m ruff check backends kvbridge scripts tests
python3 -m mypy backends kvbridge
python3 -m pytest -q "$@"
