#!/usr/bin/env bash
# Issue 13 on a GPU: is speed=graphs (and compile) exact and how fast, and what does sharing
# one GPU between K training processes buy? Writes into OUT_DIR as it goes, so a time-out
# still leaves the finished parts. Where hydra/omegaconf/sdrun are not importable (the bare
# H200 machine), it installs gpu_bundle/wheels/*.whl (scripts/gpu_bundle.sh, carried with
# the call) into a temp target, as scripts/gpu_acceptance.sh does, and runs everything from a
# work folder against that installed sdrun (its config tree as packaged).
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
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sdrun_speed.XXXXXX")
if ! "$PY" -c "import hydra, omegaconf, sdrun.conf" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
        "$REPO"/gpu_bundle/wheels/*.whl >"$OUT/install.txt" 2>&1 || { echo "install failed: $OUT/install.txt"; exit 1; }
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
cp "$REPO/tests/test_cuda_speed.py" "$WORK/"  # standalone: imports only sdrun
cd "$WORK"
export PYTHONUNBUFFERED=1
run() {  # run NAME SECONDS CMD...: output to OUT/NAME.txt, one status line to OUT/status.txt
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "$name rc=$? ${limit}s-limit took $((SECONDS - t0))s" | tee -a "$OUT/status.txt"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1

# 1. graphs vs eager over 50 steps (same gates), fused vs foreach SGD: the exactness tolerances
run cuda_tests_graphs 240 $PY -m pytest -m cuda -q -rs test_cuda_speed.py -p no:cacheprovider -k "not compile"
# 2. eager vs graphs: ms/step, img/s, projected 500-epoch minutes, SD/constant ratio
run bench_speed 300 $PY -m sdrun bench --device cuda --speed eager,graphs --steps 20 --repeats 5 \
    --compile-warmup 10 --out "$OUT/bench_speed.json"
# 3. K concurrent ResNet-110 processes on the one GPU (eager, then graphs)
run bench_concurrent 400 $PY -m sdrun bench --device cuda --concurrent 1,2,4,8 --window 10 \
    --out "$OUT/bench_concurrent.json"
run bench_concurrent_graphs 400 $PY -m sdrun bench --device cuda --concurrent 1,4,8 --window 10 \
    --concurrent-speed graphs --out "$OUT/bench_concurrent_graphs.json"
# 4. the slow ones: per-branch compile against eager, and its speed
run cuda_tests_compile 400 $PY -m pytest -m cuda -q -rs test_cuda_speed.py -p no:cacheprovider -k compile
run bench_speed_compile 400 $PY -m sdrun bench --device cuda --speed eager,compile --steps 20 --repeats 5 \
    --compile-warmup 20 --out "$OUT/bench_speed_compile.json"
tail -n 3 "$OUT"/*.txt
