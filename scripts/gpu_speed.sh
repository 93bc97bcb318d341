#!/usr/bin/env bash
# Call 2 of a lent GPU (issues 13, 21), after scripts/gpu_acceptance.sh: what call 1 had no time
# for, in at most 5 minutes of command time (docs/gpu/runbook.md): K concurrent training
# processes on the one GPU, eager vs per-branch torch.compile, the compile tests, and the
# 500-epoch projections of each. (Graphs vs eager, their exactness tests and fused vs foreach
# SGD run in call 1.)
#
#   scripts/gpu_speed.sh OUT_DIR [--cpu-smoke] [--bundle DIR]
#   scripts/gpu_speed.sh --plan [--cpu-smoke]     each step and its limit; runs nothing
#
# On the H200 machine (bare: no hydra/omegaconf/antlr, no network), with gpu_bundle/ carried:
#   -  refuses (exit 2, one line) a bundle whose STAMP is not this checkout's sources;
#   install        gpu_bundle/wheels/*.whl into a temp target, no dependencies; everything
#                  runs from a work folder against that installed sdrun (its config as packaged);
#   concurrent     sdrun bench --concurrent 1,2,4,8 (eager ResNet-110, batch 128, p_L 0.5):
#                  aggregate images/s per K, one run's and Table 1's six runs' projected hours;
#   bench_compile  sdrun bench --speed eager,compile: ms/step, images/s, SD ratio, compile
#                  time, the projected 500 epochs, per mode;
#   compile_tests  the compile tests of tests/test_cuda.py and tests/test_cuda_speed.py, in the
#                  time the steps above left (cold inductor compiles are the slowest, least
#                  predictable part; the figures above do not wait for them).
# Order = value per second: the concurrency figures are cheap and certain, then compile's
# speed, then its exactness. Every bench saves its report after each K / timed repeat, and
# OUT_DIR/speed_report.md and speed_report.json are rewritten after every step, so a time-out
# leaves the finished parts. OUT_DIR ends with 4 files (the device tool returns 8):
# speed_report.md, speed_report.json, speed.log and speed_raw.tar.gz (the raw bench reports,
# the junit file, steps.tsv).
#
# --cpu-smoke: the same steps with tiny sizes on the CPU (device=cpu, ResNet-8, a 0.3 s window,
# the interpreter's own sdrun; bench_compile runs eager only, since inductor's CPU compile would
# take ~40 s on 2 cores; the compile tests are collected and skip themselves without CUDA). CI
# runs it (tests/test_gpu_acceptance.py). PYTHON=...: the interpreter (default python3 on the
# GPU, .venv/bin/python in smoke mode).
#
# The plan arithmetic, the step runner (limits, carry-over, deadline), argument parsing, the
# bundle check and the report plumbing are shared with call 1: scripts/gpu_steps.sh.
set -uo pipefail
START=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/scripts/gpu_steps.sh"
SCRIPT=gpu_speed
USAGE="usage: scripts/gpu_speed.sh OUT_DIR [--cpu-smoke] [--bundle DIR] | --plan [--cpu-smoke]"
BUNDLE=$REPO/gpu_bundle
declare -A PATH_OPTIONS=([--bundle]=BUNDLE)
parse_args "$@"

# ---- the plan: the one source of every step's limit (a floor, a step also gets the time the
# steps before it left unused: scripts/gpu_steps.sh).
# Estimates for the H200, not measurements: spawned python + torch + sdrun ~5 s per process,
# an eager ResNet-110 step at batch 128 ~25-40 ms (launch-bound), a cold inductor compile of
# one branch graph (forward + backward) ~5-10 s after ~10 s of first use.
BUDGET=300   # the issue's 5 minutes of command time for this call
RESERVE=10   # after the last step: the last report and the archive (~2 s), and timeout's 5 s grace
MIN_REST=30  # the elastic step runs only with at least this much left
# name         limit  what it runs and why the limit
PLAN_GPU="
install          10  pip installs the bundle's 4 wheels, no dependencies: 0.6-0.9 s on a 2-core VM here
reports           5  not a step: gpu_report.py after each step (the first imports torch, ~5 s with the others)
concurrent       75  K = 1, 2, 4, 8 processes, each ~5-8 s to spawn and import, ~3 s of warm-up, a 4 s window: ~11-17 s per K, ~55-60 s in all
bench_compile    90  eager vs compile, 4 configurations: ~5 s start, 5 branch graphs compiled (~35-60 s), (10 + 3 x 10) steps each: ~45-70 s
compile_tests  rest  the compile tests of both files (cold inductor compiles: 60-150 s)
"
SMOKE_LIMIT=60  # --cpu-smoke: every step (each takes 2-10 s on 2 loaded cores), the run the sum

plan_or_out_dir
check_bundle
start_run sdrun_speed speed.log

if ((SMOKE)); then
    PY=${PYTHON:-$REPO/.venv/bin/python}
    DEVICE=cpu
    SIZE=(--depth 8 --batch-size 8 --threads 1)
    CONCURRENT=(--concurrent 1,2,4,8 --window 0.3 --chunk 1 --warmup 1)
    COMPILE=(--speed eager --steps 1 --repeats 2 --compile-warmup 1)
    export OMP_NUM_THREADS=1
else
    PY=${PYTHON:-python3}
    DEVICE=cuda
    # TF32, as every earlier speed report under docs/gpu/ (fidelity=reference now implies fp32)
    SIZE=(--depth 110 --batch-size 128 --precision tf32)
    # --barrier-timeout: a K whose processes cannot all start (out of memory, say) fails after
    # 40 s with its reason instead of holding the step to its limit.
    CONCURRENT=(--concurrent 1,2,4,8 --window 4 --chunk 10 --warmup 3 --barrier-timeout 40)
    # 10 untimed steps per configuration, so that every branch has run (and every shape is
    # compiled) before the timed steps, also the p_L 0.5 model's rarely drawn last blocks.
    COMPILE=(--speed eager,compile --steps 10 --repeats 3 --compile-warmup 10)
fi

report() {  # speed_report.json and speed_report.md from what has finished
    run_report --call speed
}

# ---- install (GPU mode): the wheels; the tests run from the work folder against them
step_install  # the step install (scripts/gpu_steps.sh): the wheels; tests/ into the work folder
report

# ---- K concurrent training processes sharing the device
step concurrent "$PY" -m sdrun bench --device "$DEVICE" "${SIZE[@]}" "${CONCURRENT[@]}" \
    --out "$WORK/bench_concurrent.json"
report

# ---- eager vs per-branch compile
((SMOKE)) && echo "gpu_speed: cpu-smoke: bench_compile runs eager only (inductor's CPU compile takes ~40 s here)"
step bench_compile "$PY" -m sdrun bench --device "$DEVICE" "${SIZE[@]}" "${COMPILE[@]}" --out "$WORK/bench_compile.json"
report

# ---- the compile tests, in whatever time is left
step compile_tests "$PY" -m pytest -v -m cuda -k compile -p no:cacheprovider --junitxml="$WORK/pytest_compile.xml" \
    tests/test_cuda.py tests/test_cuda_speed.py

# ---- the report, and the raw files in one archive (OUT_DIR holds at most 8 files)
report
(cd "$WORK" && find . -maxdepth 1 \( -name 'bench_*.json' -o -name 'pytest*.xml' -o -name steps.tsv \
    -o -name env.json \) -print0 | tar --null -czf "$OUT_DIR/speed_raw.tar.gz" -T -)
finish
