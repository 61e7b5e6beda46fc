#!/usr/bin/env bash
# Installs triton-pd and runs the main job: serve the default model and stream a reply.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e ".[server]"
triton-pd demo --prompt "${1:-The capital of France is}"
