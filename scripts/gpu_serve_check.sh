#!/usr/bin/env bash
# The whole disaggregated path on one device (issue 11's last target): `triton-pd serve` with a
# prefill and a decode worker on $GPU_SERVE_DEVICE (default cuda:0), greedy requests through
# `llm` over HTTP (curl; no tritonclient needed), each text compared with the engine alone on the
# same device (built from the same deployment's EngineSpec, run in-process meanwhile), the KV
# bytes each request moved (the orchestrator's pd_kv_transfer_bytes_total), the transport named
# by a prefill's KV handle (a context_only probe straight to the prefill worker), which stubs
# hold /dev/nvidia* and which numpy they loaded, and KV failures in the server log.
#
# Run from anywhere on the lent GPU machine with $OUT set: `bash scripts/gpu_serve_check.sh`.
# Writes $OUT/serve.json (verdict, checks, per-request results) and $OUT/serve.txt (this
# output and the server log's tail; when stdout already is $OUT/serve.txt, as under
# gpu_check.sh's serve stage, it only prints). Exit 0 only on PASS, 1 on FAIL, 2 when it could
# not start; 143/130 when signalled.
#
# What the GPU machine lacks travels in the git-ignored $GPU_SERVE_CARRY (default .gpucarry/;
# name it in the run's carry): pytriton-*.tar.xz (the nvidia-pytriton 0.7.0 wheel's files less
# libpython3.13 and the stubs of other Pythons) and numpy-*.whl (1.26.4 cp312). When the folder
# exists the script unpacks the wheel's files, makes a venv (--system-site-packages, no pip)
# with that numpy (the python_backend stubs are built against numpy 1.x: numpy 2 corrupts every
# input tensor) and a .pth naming the unpacked wheel (find_triton then finds it as the
# "pytriton" install) and this checkout, and runs everything with the venv's python: serve puts
# its bin first on PATH, and the stubs take their site-packages (.pth files included) from the
# first python3 on PATH. Without the folder it uses python3 and whatever tritonserver
# find_triton finds. CPU rehearsal: GPU_SERVE_DEVICE=cpu GPU_SERVE_CARRY=none (or a carry folder
# built for this machine's Python).
#
# Every wait has a deadline inside GPU_SERVE_BUDGET_S (default 150 s: work stops 40 s before it,
# which the verdict and the cleanup use); the server runs under setsid, and its process groups
# are always stopped (TERM, then KILL) and its /dev/shm leftovers removed on exit.
# GPU_SERVE_DTYPE (float32: greedy exactness), GPU_SERVE_MAX_TOKENS (24), GPU_SERVE_KEEP_WORK=1
# keeps the scratch directory.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
DEVICE=${GPU_SERVE_DEVICE:-cuda:0}
DTYPE=${GPU_SERVE_DTYPE:-float32}
BUDGET=${GPU_SERVE_BUDGET_S:-150}
MAX_TOKENS=${GPU_SERVE_MAX_TOKENS:-24}
CARRY=${GPU_SERVE_CARRY:-$ROOT/.gpucarry}
OUT=${OUT:-/tmp/gpu_serve_check}
CLEANUP_RESERVE=40  # seconds kept for the verdict, stopping the server and cleaning up
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset KVBRIDGE_MASTER  # serve starts its own loopback master
T0=$SECONDS
WORK=$(mktemp -d /tmp/pd-serve-check.XXXXXX)
HELPER="$ROOT/scripts/gpu_serve_check.py"
PY=python3
SERVE_PID="" SERVE_PGID="" TS_PID="" REF_PID="" TEE_PID="" FG_PID=""

# serve.txt: our stdout, plus a copy in $OUT/serve.txt unless stdout already is that file.
if [ "$(readlink -f /proc/$$/fd/1 2>/dev/null)" != "$(readlink -f "$OUT/serve.txt" 2>/dev/null)" ]; then
    # tee ignores TERM/INT so that cleanup's output still lands when a timeout signals our group
    exec > >(trap '' TERM INT; exec tee "$OUT/serve.txt") 2>&1
    TEE_PID=$!
else
    exec 2>&1
fi

elapsed() { echo $((SECONDS - T0)); }
left() { echo $((BUDGET - CLEANUP_RESERVE - (SECONDS - T0))); }
say() { echo "[$(elapsed)s] $*"; }
# bounded SECS CMD...: CMD under a deadline of min(SECS, what the budget leaves), at least 1 s.
# timeout puts CMD in a process group of its own, which a signal to ours does not reach: run it
# in the background and `wait` (which a trapped signal interrupts at once), so that cleanup
# runs without delay and can stop that group too.
bounded() {
    local secs=$1 budget rc; shift
    budget=$(left)
    [ "$budget" -lt "$secs" ] && secs=$budget
    [ "$secs" -lt 1 ] && secs=1
    timeout -k 3 "$secs" "$@" &
    FG_PID=$!
    wait "$FG_PID"
    rc=$?
    FG_PID=""
    return $rc
}
# stop_group PID SIG: signal PID's process group (timeout's), or PID alone if it leads none.
stop_group() { [ -n "$1" ] && { kill "-$2" -- "-$1" 2>/dev/null || kill "-$2" "$1" 2>/dev/null; }; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
group_alive() { [ -n "$1" ] && kill -0 -- "-$1" 2>/dev/null; }

cleanup() {
    local rc=$? deadline
    trap - EXIT INT TERM
    say "cleanup (exit status so far $rc)"
    stop_group "$FG_PID" TERM
    stop_group "$REF_PID" TERM
    # The stubs' shm regions, while they live (a stub killed later leaves its region behind).
    if group_alive "$TS_PID"; then
        timeout 10 "$PY" "$HELPER" shm-regions --work "$WORK" --pgid "$TS_PID" --merge "$WORK/shm_regions.json" \
            >/dev/null 2>&1
    fi
    if alive "$SERVE_PID"; then  # serve stops tritonserver (grace 15 s), its stubs and the master
        kill -TERM "$SERVE_PID" 2>/dev/null
        # Before ready, serve is inside wait_ready and only notices tritonserver's exit: stop that.
        [ -f "$WORK/ready" ] || { alive "$TS_PID" && kill -TERM "$TS_PID" 2>/dev/null; }
        deadline=$((SECONDS + 22))
        while alive "$SERVE_PID" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    fi
    # Whatever is left of either process group: KILL (serve is its own group via setsid,
    # tritonserver and its stubs another via start_new_session).
    for g in "$SERVE_PGID" "$TS_PID"; do
        if group_alive "$g" && [ "$g" != "$(ps -o pgid= -p $$ | tr -d ' ')" ]; then
            say "killing process group $g"
            kill -KILL -- "-$g" 2>/dev/null
        fi
    done
    stop_group "$FG_PID" KILL
    stop_group "$REF_PID" KILL
    deadline=$((SECONDS + 5))
    while { group_alive "$SERVE_PGID" || group_alive "$TS_PID"; } && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if [ -n "$TS_PID" ] && ! group_alive "$TS_PID"; then
        timeout 20 "$PY" "$HELPER" shm-cleanup --work "$WORK" --pgid "$TS_PID" || true
    fi
    if [ -f "$WORK/server.log" ]; then
        echo "---- server log: last 40 of $(wc -l <"$WORK/server.log") lines, Triton's tables left out"
        grep -v -E '^[|+]|^$' "$WORK/server.log" | tail -n 40 | cut -c1-400
        echo "----"
    fi
    left_over=$(ps -eo pid=,pgid=,comm= | awk -v a="$SERVE_PGID" -v b="$TS_PID" '($2==a && a!="") || ($2==b && b!="")')
    [ -n "$left_over" ] && say "STILL RUNNING: $left_over"
    [ "${GPU_SERVE_KEEP_WORK:-0}" = 1 ] && say "kept $WORK" || rm -rf "$WORK"
    case $rc in 0) verdict=PASS ;; 1) verdict=FAIL ;; *) verdict="NOT RUN" ;; esac
    say "done in $(elapsed)s: $verdict on $DEVICE (exit $rc; details in $OUT/serve.json and above)"
    if [ -n "$TEE_PID" ]; then  # let tee finish $OUT/serve.txt before we return
        exec >&- 2>&-
        wait "$TEE_PID" 2>/dev/null
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "gpu_serve_check: device $DEVICE dtype $DTYPE budget ${BUDGET}s work $WORK out $OUT"

# 1. What the machine lacks: tritonserver from the carried wheel files, numpy 1.x in a venv.
if [ -d "$CARRY" ]; then
    tarball=$(ls "$CARRY"/pytriton-*.tar.xz 2>/dev/null | head -1)
    wheel=$(ls "$CARRY"/numpy-*.whl 2>/dev/null | head -1)
    if [ -z "$tarball" ] || [ -z "$wheel" ]; then
        say "FAIL: $CARRY lacks pytriton-*.tar.xz or numpy-*.whl"; exit 2
    fi
    mkdir -p "$WORK/carry"
    if ! bounded 40 tar -xJf "$tarball" -C "$WORK/carry" 2>"$WORK/tar.err"; then
        say "tar -xJ failed ($(head -c 300 "$WORK/tar.err")); unpacking with python's tarfile"
        bounded 60 python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
            "$tarball" "$WORK/carry" || { say "FAIL: cannot unpack $tarball"; exit 2; }
    fi
    bounded 30 python3 -m venv --system-site-packages --without-pip "$WORK/venv" \
        || { say "FAIL: python3 -m venv"; exit 2; }
    site=$("$WORK/venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if ! bounded 60 python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
            --target "$site" "$wheel" >"$WORK/pip.log" 2>&1; then
        say "pip --target failed ($(tail -c 300 "$WORK/pip.log")); unzipping the wheel"
        bounded 60 python3 -m zipfile -e "$wheel" "$site" || { say "FAIL: cannot install $wheel"; exit 2; }
    fi
    # The carried wheel's files, and this checkout: the stubs' embedded interpreters take their
    # site-packages (and .pth files) from this venv whether or not they honour PYTHONPATH.
    # A venv made from inside another venv (the GPU machine's python3 is /opt/torch/.venv) is
    # based on the system interpreter: the outer venv's site-packages (torch, yaml, ...) are
    # named here too, after this venv's own (so the carried numpy 1.x still wins).
    outer=$(python3 -c 'import site; print("\n".join(site.getsitepackages()))')
    printf '%s\n' "$WORK/carry" "$ROOT" $outer >"$site/pd_gpucarry.pth"
    PY="$WORK/venv/bin/python3"
    export PATH="$WORK/venv/bin:$PATH"
    say "venv $WORK/venv ($("$PY" -V 2>&1)), carried tritonserver in $WORK/carry, stubs for Python" \
        "$(ls "$WORK/carry/pytriton/tritonserver/python_backend_stubs" 2>/dev/null | tr '\n' ' ')"
else
    say "no carry folder ($CARRY): $(python3 -V 2>&1) at $(command -v python3)"
fi
numpy_info=$(bounded 30 "$PY" -c 'import numpy; print(numpy.__version__, numpy.__file__)' 2>&1 | tail -1)
say "numpy in $PY: $numpy_info"
case "$numpy_info" in
    1.*) ;;
    2.*) say "WARNING: numpy 2 where the python_backend stubs load theirs: they corrupt input tensors" ;;
    *) say "WARNING: numpy does not import in $PY" ;;
esac

# 2. The tritonserver that `triton-pd serve` will use.
if ! bounded 60 "$PY" "$HELPER" find-triton --work "$WORK" >"$WORK/triton.json"; then
    say "FAIL: no tritonserver: $(cat "$WORK/triton.json")"; exit 2
fi
say "tritonserver: $(cat "$WORK/triton.json")"
if [ -d "$CARRY" ] && ! grep -q "\"server_bin\": \"$WORK/carry/" "$WORK/triton.json"; then
    say "WARNING: the carried tritonserver was not the one found"
fi

# 3. The deployment: one prefill and one decode worker on $DEVICE.
cat >"$WORK/deploy.yaml" <<EOF
model: tiny-llama
disaggregation: true
prefill: {count: 1, devices: [$DEVICE]}
decode: {count: 1, devices: [$DEVICE]}
engine: {block_size: 16, num_blocks: 256, max_num_seqs: 8, max_num_batched_tokens: 1024,
         max_model_len: 512, dtype: $DTYPE}
serving: {max_tokens: 256}
EOF
read -r HTTP GRPC METRICS < <(bounded 30 "$PY" "$HELPER" ports)
[ -n "${METRICS:-}" ] || { say "FAIL: no free ports"; exit 2; }
say "ports http $HTTP grpc $GRPC metrics $METRICS"

# 4. The server, in its own session; the plan and the engine alone meanwhile.
ready_s=$(( $(left) > 10 ? $(left) : 10 ))
setsid "$PY" -m backends.cli serve --config "$WORK/deploy.yaml" --http-port "$HTTP" --grpc-port "$GRPC" \
    --metrics-port "$METRICS" --ready-timeout "$ready_s" >"$WORK/server.log" 2>&1 </dev/null &
SERVE_PID=$!
sleep 0.5
SERVE_PGID=$(ps -o pgid= -p "$SERVE_PID" 2>/dev/null | tr -d ' ')
SERVE_PGID=${SERVE_PGID:-$SERVE_PID}  # setsid made serve a group leader
say "serve pid $SERVE_PID (process group ${SERVE_PGID:-?})"
bounded 60 "$PY" "$HELPER" plan --work "$WORK" --config "$WORK/deploy.yaml" --max-tokens "$MAX_TOKENS" \
    || { say "FAIL: plan"; exit 2; }
ref_s=$(left); [ "$ref_s" -lt 1 ] && ref_s=1
timeout -k 3 "$ref_s" "$PY" "$HELPER" reference --work "$WORK" --config "$WORK/deploy.yaml" \
    >"$WORK/ref.log" 2>&1 &
REF_PID=$!  # timeout's pid, leader of the reference's process group

# 5. Ready within the budget; tritonserver's pid is serve's child of that name.
url="http://127.0.0.1:$HTTP"
while :; do
    [ -z "$TS_PID" ] && TS_PID=$(ps -o pid=,comm= --ppid "$SERVE_PID" 2>/dev/null | awk '$2=="tritonserver"{print $1; exit}')
    if curl -sf -o /dev/null --max-time 2 "$url/v2/health/ready"; then touch "$WORK/ready"; break; fi
    if ! alive "$SERVE_PID"; then say "FAIL: serve exited before ready"; break; fi
    if [ "$(left)" -le 0 ]; then say "FAIL: not ready within the budget"; break; fi
    sleep 0.5
done
if [ -f "$WORK/ready" ]; then
    # serve prints "(tritonserver pid N)" once ready: the fallback where ps lacks --ppid
    [ -z "$TS_PID" ] && sleep 1 && TS_PID=$(grep -o 'tritonserver pid [0-9]*' "$WORK/server.log" | head -1 | awk '{print $3}')
    say "ready (tritonserver pid ${TS_PID:-?})"
    [ -n "$TS_PID" ] && timeout 10 "$PY" "$HELPER" shm-regions --work "$WORK" --pgid "$TS_PID" \
        --merge "$WORK/shm_regions.json" >/dev/null

    # 6. Greedy requests through llm, one at a time; the KV byte counter around each.
    metric() { grep -E "^pd_kv_transfer_bytes_total\{model=\"llm\"\} " "$1" 2>/dev/null | awk '{print $2}'; }
    i=0
    while [ -f "$WORK/body_$i.json" ]; do
        [ "$(left)" -le 2 ] && { say "budget spent: request $i and later not sent"; break; }
        curl -sS --max-time 5 -o "$WORK/metrics_${i}_before.txt" "http://127.0.0.1:$METRICS/metrics"
        bounded 60 curl -sS --max-time 60 -o "$WORK/resp_$i.json" -w '%{http_code}' \
            -H 'Content-Type: application/json' --data-binary "@$WORK/body_$i.json" \
            "$url/v2/models/llm/generate" >"$WORK/resp_$i.code"
        before=$(metric "$WORK/metrics_${i}_before.txt")
        deadline=$((SECONDS + 5))  # the orchestrator records metrics just after the final response
        while :; do
            curl -sS --max-time 5 -o "$WORK/metrics_${i}_after.txt" "http://127.0.0.1:$METRICS/metrics"
            [ "$(metric "$WORK/metrics_${i}_after.txt")" != "$before" ] && break
            [ $SECONDS -ge $deadline ] && break
            sleep 0.1
        done
        say "request $i: http $(cat "$WORK/resp_$i.code"), kv bytes ${before:-none} -> $(metric "$WORK/metrics_${i}_after.txt")"
        i=$((i + 1))
    done

    # 7. The transport: a prefill's KV handle (context_only straight to the prefill worker).
    bounded 30 curl -sS --max-time 30 -o "$WORK/probe_resp.json" -w '%{http_code}' \
        -H 'Content-Type: application/json' --data-binary "@$WORK/probe.json" \
        "$url/v2/models/prefill/generate" >"$WORK/probe.code"
    say "probe: http $(cat "$WORK/probe.code")"
    sleep 0.5  # worker metrics refresh every 0.2 s: the import counters of every request
    bounded 10 curl -sS --max-time 5 -o "$WORK/metrics_final.txt" "http://127.0.0.1:$METRICS/metrics"
    [ -n "$TS_PID" ] && timeout 20 "$PY" "$HELPER" gpu-users --work "$WORK" --pgid "$TS_PID" >"$WORK/gpu_users.json"
    if [[ "$DEVICE" == cuda* ]] && command -v nvidia-smi >/dev/null; then
        timeout 20 nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader \
            >"$WORK/gpu_apps.csv" 2>&1
    fi
fi

# 8. The engine alone must have finished by now (it had the whole server start-up).
while alive "$REF_PID" && [ "$(left)" -gt 0 ]; do sleep 0.2; done
alive "$REF_PID" && { say "reference still running at the deadline: killed"; stop_group "$REF_PID" KILL; }
wait "$REF_PID" 2>/dev/null
REF_PID=""
tail -n 5 "$WORK/ref.log"

# 9. The verdict.
timeout 20 "$PY" "$HELPER" compare --work "$WORK" --device "$DEVICE" --out "$OUT/serve.json"
status=$?
exit $status
