#!/usr/bin/env bash
# Issue 13 on a GPU: is speed=graphs (and compile) exact and how fast, and what does sharing
# one GPU between K training processes buy? Writes into OUT_DIR as it goes, so a time-out
# still leaves the finished parts. Meant to run after scripts/gpu_acceptance.sh has made
# sdrun importable (its wheels step), or anywhere sdrun and a CUDA torch are installed.
#
#   scripts/gpu_speed.sh OUT_DIR
#
# Order = value per second: exactness of graphs, eager vs graphs speed, K concurrent
# processes, then the slow compile parts. Rough sizes on a launch-bound GPU (estimates, not
# measurements): tests 30-60 s, speed 60-90 s, concurrent 4 x (start ~20 s + 10 s window),
# compile parts several minutes of inductor compile time (each has its own timeout).
set -u
OUT=${1:?usage: scripts/gpu_speed.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
run() {  # run NAME SECONDS CMD...: output to OUT/NAME.txt, one status line to OUT/status.txt
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "$name rc=$? ${limit}s-limit took $((SECONDS - t0))s" | tee -a "$OUT/status.txt"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1

# 1. graphs vs eager over 50 steps (same gates), fused vs foreach SGD: the exactness tolerances
run cuda_tests_graphs 240 $PY -m pytest -m cuda -q -rs tests/test_cuda_speed.py -k "not compile"
# 2. eager vs graphs: ms/step, img/s, projected 500-epoch minutes, SD/constant ratio
run bench_speed 300 $PY -m sdrun bench --device cuda --speed eager,graphs --steps 20 --repeats 5 \
    --compile-warmup 10 --out "$OUT/bench_speed.json"
# 3. K concurrent ResNet-110 processes on the one GPU (eager, then graphs)
run bench_concurrent 400 $PY -m sdrun bench --device cuda --concurrent 1,2,4,8 --window 10 \
    --out "$OUT/bench_concurrent.json"
run bench_concurrent_graphs 400 $PY -m sdrun bench --device cuda --concurrent 1,4,8 --window 10 \
    --concurrent-speed graphs --out "$OUT/bench_concurrent_graphs.json"
# 4. the slow ones: per-branch compile against eager, and its speed
run cuda_tests_compile 400 $PY -m pytest -m cuda -q -rs tests/test_cuda_speed.py -k compile
run bench_speed_compile 400 $PY -m sdrun bench --device cuda --speed eager,compile --steps 20 --repeats 5 \
    --compile-warmup 20 --out "$OUT/bench_speed_compile.json"
tail -n 3 "$OUT"/*.txt
