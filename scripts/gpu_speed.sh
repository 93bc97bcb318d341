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
set -uo pipefail
START=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
USAGE="usage: scripts/gpu_speed.sh OUT_DIR [--cpu-smoke] [--bundle DIR] | --plan [--cpu-smoke]"
OUT_DIR= SMOKE=0 PLAN_ONLY=0 BUNDLE=$REPO/gpu_bundle
while (($#)); do
    case $1 in
        --cpu-smoke) SMOKE=1 ;;
        --plan) PLAN_ONLY=1 ;;
        --bundle)
            [[ $# -ge 2 && -n $2 ]] || { echo "gpu_speed: error: --bundle needs a path" >&2; exit 2; }
            BUNDLE=$2
            shift ;;
        -*) echo "gpu_speed: error: unknown option $1 ($USAGE)" >&2; exit 2 ;;
        *) [[ -z $OUT_DIR ]] || { echo "gpu_speed: error: one OUT_DIR only, got $OUT_DIR and $1" >&2; exit 2; }
           OUT_DIR=$1 ;;
    esac
    shift
done

# ---- the plan: the one source of every step's limit (as in scripts/gpu_acceptance.sh: a
# floor, a step also gets the time the steps before it left unused).
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

plan_rows() { printf '%s\n' "$PLAN_GPU" | awk 'NF { print $1, $2 }'; }
plan_limit() {  # plan_limit NAME: its limit in this mode ("rest" for the elastic step on the GPU)
    local limit
    limit=$(plan_rows | awk -v n="$1" '$1 == n { print $2 }')
    [[ -n $limit ]] || { echo "gpu_speed: internal error: step $1 is not in the plan" >&2; exit 3; }
    ((SMOKE)) && limit=$SMOKE_LIMIT
    echo "$limit"
}
fixed_total() {  # the reserve and every limit but the elastic step's
    local sum=$RESERVE name limit
    for name in $(plan_rows | awk '{ print $1 }'); do
        limit=$(plan_limit "$name")
        [[ $limit == rest ]] || sum=$(( sum + limit ))
    done
    echo "$sum"
}
budget() { ((SMOKE)) && fixed_total || echo "$BUDGET"; }
rest_share() { local r=$(( $(budget) - $(fixed_total) )); echo $(( r > 0 ? r : 0 )); }  # the elastic step's planned seconds
reserved_after() {  # reserved_after NAME: the plan seconds still owed to the steps after NAME and to the reports
    local sum=0 after=0 name limit
    for name in $(plan_rows | awk '{ print $1 }'); do
        limit=$(plan_limit "$name")
        [[ $limit == rest ]] && limit=$(rest_share)
        if ((after)) || [[ $name == reports ]]; then sum=$(( sum + limit )); fi
        [[ $name == "$1" ]] && after=1
    done
    echo "$sum"
}
plan_steps() { plan_rows | awk '$1 != "reports" { print $1 }' | paste -sd, -; }  # "reports" is an allowance, not a step
print_plan() {
    local name limit what fixed rest
    fixed=$(fixed_total) rest=$(rest_share)
    echo "gpu_speed plan, $( ((SMOKE)) && echo "cpu-smoke mode (every step ${SMOKE_LIMIT} s; the notes are the GPU run's)" || echo gpu mode): steps in order, each with its time limit (a floor: a step also gets what the steps before it left unused)"
    while read -r name limit what; do
        [[ -n $name ]] || continue
        limit=$(plan_limit "$name")
        if [[ $limit == rest ]]; then
            printf '  %-14s %4s s + the time the steps above leave unused (skipped under %s s): %s\n' "$name" "$rest" "$MIN_REST" "$what"
        else
            printf '  %-14s %4s s  %s\n' "$name" "$limit" "$what"
        fi
    done <<< "$PLAN_GPU"
    printf '  %-14s %4s s  after the deadline: the last report, the archive, timeout'"'"'s grace\n' final "$RESERVE"
    echo "total: $(( fixed + rest )) s"
}
if ((PLAN_ONLY)); then
    print_plan
    exit 0
fi
[[ -n $OUT_DIR ]] || { echo "gpu_speed: error: no OUT_DIR ($USAGE)" >&2; exit 2; }

# ---- the bundle must be this checkout's (GPU mode; bash and sha256sum only, no .git needed)
if ! ((SMOKE)); then
    verdict=$(bash "$REPO/scripts/gpu_bundle.sh" --check "$BUNDLE" 2>&1) \
        || { echo "gpu_speed: error: $verdict" >&2; exit 2; }
fi

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sdrun_speed.XXXXXX")
exec > >(tee -a "$OUT_DIR/speed.log") 2>&1
export PYTHONUNBUFFERED=1
DEADLINE=$(( $(budget) - RESERVE ))  # seconds from START by which every step has ended

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
    SIZE=(--depth 110 --batch-size 128)
    # --barrier-timeout: a K whose processes cannot all start (out of memory, say) fails after
    # 40 s with its reason instead of holding the step to its limit.
    CONCURRENT=(--concurrent 1,2,4,8 --window 4 --chunk 10 --warmup 3 --barrier-timeout 40)
    # 10 untimed steps per configuration, so that every branch has run (and every shape is
    # compiled) before the timed steps, also the p_L 0.5 model's rarely drawn last blocks.
    COMPILE=(--speed eager,compile --steps 10 --repeats 3 --compile-warmup 10)
fi
: > "$WORK/steps.tsv"
echo "gpu_speed: $( ((SMOKE)) && echo cpu-smoke || echo gpu ) mode, out $OUT_DIR, work $WORK, $(date -u +%FT%TZ)"
((SMOKE)) || echo "gpu_speed: $verdict"

record() {  # record NAME RC MS LIMIT [NOTE]: one line of steps.tsv (the report reads it), with the plan's limit
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" "$(plan_limit "$1")" >> "$WORK/steps.tsv"
}

skip() {  # skip NAME REASON: a step that cannot run in this mode, recorded with its reason
    echo "---- $1: skipped: $2"
    record "$1" -2 0 0 "skipped: $2"
}

step() {  # step NAME CMD...: run from the work folder within its limit and the deadline
    # Its limit: the plan's, plus whatever the steps before it left unused, but never the time
    # owed to the steps after it (their plan limits and the reports' allowance stay theirs); the
    # elastic step ("rest") gets all that is left. So every step keeps at least its plan limit
    # (as long as the reports keep to their allowance), and time saved early goes to the next
    # step, the more valuable one, if it needs it.
    local name=$1 plan limit left min t0 rc
    shift
    plan=$(plan_limit "$name") || exit 3
    left=$(( DEADLINE - ($(date +%s) - START) ))
    if [[ $plan == rest ]]; then
        limit=$left min=$MIN_REST
    else
        limit=$(( left - $(reserved_after "$name") )) min=10
        (( limit < plan )) && limit=$plan
        (( limit > left )) && limit=$left
    fi
    if (( limit < min )); then
        echo "---- $name: skipped, ${left}s left before the ${DEADLINE}s deadline (it needs ${min}s)"
        record "$name" -1 0 "$(( left > 0 ? left : 0 ))" "skipped: out of time"
        return 0
    fi
    t0=$(date +%s%N)
    echo "---- $name (limit ${limit}s): $*"
    (cd "$WORK" && timeout --kill-after=5 "$limit" "$@") 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" "$limit"
    echo "---- $name: exit $rc"
    return 0
}

report() {  # both reports from what has finished; atomic, so a kill mid-write keeps the last
    local extra=()
    ((SMOKE)) || extra=(--stamp "$BUNDLE/STAMP")
    timeout 60 "$PY" "$REPO/scripts/gpu_report.py" --call speed --work "$WORK" --out "$OUT_DIR" \
        --mode "$( ((SMOKE)) && echo cpu-smoke || echo gpu )" --elapsed "$(( $(date +%s) - START ))" \
        --expect-steps "$(plan_steps)" "${extra[@]}" || echo "gpu_speed: report failed (exit $?)"
}

# ---- install (GPU mode): the wheels; the tests run from the work folder against them
if ((SMOKE)); then
    skip install "cpu-smoke runs the interpreter's own sdrun"
else
    step install "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$WORK/site" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
cp -r "$REPO/tests" "$REPO/pyproject.toml" "$WORK/"
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
echo "gpu_speed: done in $(( $(date +%s) - START )) s; $(ls "$OUT_DIR" | wc -l) files in $OUT_DIR"
((SMOKE)) && rm -rf "$WORK"
exit 0
