#!/usr/bin/env bash
# Call 1 of a lent GPU (issues 12, 21): everything a GPU can tell us about sdrun, in order of
# value, in at most 6 minutes of command time, so that a machine start, this call and either
# call 2 (scripts/gpu_speed.sh, 5 minutes) or a second try of this one on a fresh machine fit
# the 15 minutes of device time (docs/gpu/runbook.md).
#
#   scripts/gpu_acceptance.sh OUT_DIR [--cpu-smoke] [--data ZIP_OR_DIR] [--bundle DIR]
#   scripts/gpu_acceptance.sh --plan [--cpu-smoke]     each step and its limit; runs nothing
#
# On the H200 machine (bare: python3 with torch, no hydra/omegaconf/antlr, no network),
# after scripts/gpu_bundle.sh filled gpu_bundle/ here and the call carried it:
#   -  refuses (exit 2, one line) a bundle whose STAMP is not this checkout's sources;
#   install  gpu_bundle/wheels/*.whl (hydra-core, omegaconf, antlr4, sdrun) into a temp target
#      without dependencies; sdrun runs from that wheel (its config tree as packaged), from a
#      work folder outside the checkout so the checkout's sources cannot shadow it;
#   data     unzips gpu_bundle/cifar10-subset.zip, checks that the installed sdrun imports;
#   pytest   the CUDA tests of tests/test_cuda.py (its no-sync tests first) then
#      tests/test_cuda_speed.py (graphs vs eager, fused vs foreach SGD), compile tests excluded;
#   bench_tf32, bench_bf16, bench_fp32   sdrun bench --sections sd, eager: ResNet-110, batch
#      128, p_L 0.5 vs 1.0: images/s, the SD step ratio, peak GPU memory, the projected 500
#      CIFAR epochs; one process per precision, each report on disk as soon as it ends;
#   graphs   sdrun bench --speed eager,graphs (the same, per speed mode);
#   train_a, train_b   sdrun train on the real CIFAR-10 images of gpu_bundle/cifar10-subset.zip:
#      a. ResNet-110 p_L = 0.5, 2 epochs: seconds per epoch through the whole trainer (data,
#         augmentation, statistics, evaluation, checkpoints, logging; the first epoch also
#         pays cuDNN's search, the second is steady);
#      b. a short schedule whose test error is predicted below, before it runs;
#   compile  the compile tests of both files, only in the time the steps above left unused
#      (scripts/gpu_speed.sh, call 2, runs them again with time of their own).
# OUT_DIR/gpu_report.md and gpu_report.json (GPU, driver, versions, the bundle's stamp, every
# figure) are rewritten after every step, so a time-out leaves the finished parts. OUT_DIR
# ends with 4 files (the device tool returns 8): gpu_report.md, gpu_report.json,
# acceptance.log and runs.tar.gz (the training runs' results.json, metrics.jsonl, train.log,
# config; the raw bench reports and the pytest junit files).
#
# --cpu-smoke: the same steps with tiny sizes on the CPU (device=cpu, ResNet-8, a few steps;
# no wheel step: the interpreter's own sdrun; bench_tf32 and graphs are skipped with "needs
# CUDA"; the CUDA tests are collected and skip themselves). CI runs it
# (tests/test_gpu_acceptance.py) so that this script cannot rot between GPU runs.
# --data: a CIFAR-10 image-folder root, or a zip of one (default gpu_bundle/cifar10-subset.zip).
# --bundle: the bundle folder (default gpu_bundle/). PYTHON=...: the interpreter (default
# python3 on the GPU, .venv/bin/python in smoke mode).
set -uo pipefail
START=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
USAGE="usage: scripts/gpu_acceptance.sh OUT_DIR [--cpu-smoke] [--data ZIP_OR_DIR] [--bundle DIR] | --plan [--cpu-smoke]"
OUT_DIR= SMOKE=0 PLAN_ONLY=0 DATA= BUNDLE=$REPO/gpu_bundle
while (($#)); do
    case $1 in
        --cpu-smoke) SMOKE=1 ;;
        --plan) PLAN_ONLY=1 ;;
        --data|--bundle)
            [[ $# -ge 2 && -n $2 ]] || { echo "gpu_acceptance: error: $1 needs a path" >&2; exit 2; }
            [[ $1 == --data ]] && DATA=$2 || BUNDLE=$2
            shift ;;
        -*) echo "gpu_acceptance: error: unknown option $1 ($USAGE)" >&2; exit 2 ;;
        *) [[ -z $OUT_DIR ]] || { echo "gpu_acceptance: error: one OUT_DIR only, got $OUT_DIR and $1" >&2; exit 2; }
           OUT_DIR=$1 ;;
    esac
    shift
done
DATA=${DATA:-$BUNDLE/cifar10-subset.zip}

# ---- the plan: the one source of every step's limit. --plan prints it; step() reads its
# limit from here (a floor: a step also gets the time the steps before it left unused); the
# deadline below is derived from it. Limits are estimates for the H200 (launch-bound
# ResNet-110: ~25-40 ms per eager training step at batch 128; python + torch + sdrun start
# ~5 s per process), with margin; they are not measurements.
BUDGET=360   # the issue's 6 minutes of command time for this call
RESERVE=10   # after the last step: the last report and the archive (~2 s), and timeout's 5 s grace
MIN_REST=30  # the elastic step runs only with at least this much left
# name      limit  what it runs and why the limit
PLAN_GPU="
install      10  pip installs the bundle's 4 wheels, no dependencies: 0.6 s on a 2-core VM here
data         10  unzips 35,000 JPEGs (35 MB, stored), imports the installed sdrun: 2.5-10 s on a 2-core VM here (disk writeback), plus what install leaves
reports      10  not a step: gpu_report.py after each step (the first imports torch and asks nvidia-smi, ~5 s; the others ~0.3 s)
pytest      110  CUDA tests without compile, 16 tests: ~10 s start, ResNet-20 runs of 1-4 s each, one torchrun launch (two interpreters, NCCL init: ~15-25 s), graphs vs eager over 50 steps: ~75-90 s in all
bench_tf32   20  eager sd section: ~5 s start, cuDNN search, (3 + 5 x 10) steps x 2 configurations at ~25-40 ms: ~10-14 s
bench_bf16   20  the same in bf16
bench_fp32   20  the same in strict fp32 (arithmetic ~2x tf32's, still below launch cost at this width)
graphs       30  eager vs graphs: 4 configurations, 2 x 54 branch captures (~3 s), (10 + 4 x 10) steps each: ~15-20 s
train_a      30  ResNet-110 p_L 0.5, 2 epochs of 20,000 images: ~10 s start (decoding 35k JPEGs), 2 x ~4.5-6 s per epoch: ~19-22 s
train_b      85  the predicted schedule: 12 epochs x ~4.5-6 s (157 steps at 25-35 ms, evaluation, checkpoint) + ~10 s start: ~64-82 s; the steps above typically leave it 30-60 s more
compile    rest  the compile tests of both files (cold inductor compiles: 60-150 s)
"
# --cpu-smoke: every step gets SMOKE_LIMIT (a loaded 2-core machine; the smoke mode proves that
# every step runs, not how fast; each takes 2-10 s there), the run the sum of them.
SMOKE_LIMIT=60

plan_rows() { printf '%s\n' "$PLAN_GPU" | awk 'NF { print $1, $2 }'; }
plan_limit() {  # plan_limit NAME: its limit in this mode ("rest" for the elastic step on the GPU)
    local limit
    limit=$(plan_rows | awk -v n="$1" '$1 == n { print $2 }')
    [[ -n $limit ]] || { echo "gpu_acceptance: internal error: step $1 is not in the plan" >&2; exit 3; }
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
    echo "gpu_acceptance plan, $( ((SMOKE)) && echo "cpu-smoke mode (every step ${SMOKE_LIMIT} s; the notes are the GPU run's)" || echo gpu mode): steps in order, each with its time limit (a floor: a step also gets what the steps before it left unused)"
    while read -r name limit what; do
        [[ -n $name ]] || continue
        limit=$(plan_limit "$name")
        if [[ $limit == rest ]]; then
            printf '  %-11s %4s s + the time the steps above leave unused (skipped under %s s): %s\n' "$name" "$rest" "$MIN_REST" "$what"
        else
            printf '  %-11s %4s s  %s\n' "$name" "$limit" "$what"
        fi
    done <<< "$PLAN_GPU"
    printf '  %-11s %4s s  after the deadline: the last report, the archive, timeout'"'"'s grace\n' final "$RESERVE"
    echo "total: $(( fixed + rest )) s"
}
if ((PLAN_ONLY)); then
    print_plan
    exit 0
fi
[[ -n $OUT_DIR ]] || { echo "gpu_acceptance: error: no OUT_DIR ($USAGE)" >&2; exit 2; }

# ---- the bundle must be this checkout's (GPU mode): a stale sdrun wheel would be tested
# silently. Bash and sha256sum only (the checkout may arrive without .git).
if ! ((SMOKE)); then
    verdict=$(bash "$REPO/scripts/gpu_bundle.sh" --check "$BUNDLE" 2>&1) \
        || { echo "gpu_acceptance: error: $verdict" >&2; exit 2; }
fi

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sdrun_gpu.XXXXXX")
LOG=$OUT_DIR/acceptance.log
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
DEADLINE=$(( $(budget) - RESERVE ))  # seconds from START by which every step has ended

# ---- the prediction for step train_b, written down before any GPU run (issue 12).
# ResNet-110, p_L = 0.5 linear, 20,000 training images (25,000 of the subset less the 5,000
# held out for validation), batch 128 = 157 steps per epoch; 12 epochs, milestones 8 and 11.
# Under fidelity=reference (the default: epochs numbered from 1, the lr drops at the epoch
# numbered m, sdrun/schedule.py) that is lr 0.1 for 7 epochs, 0.01 for 3, 0.001 for 2
# (sdrun.engine.schedule.epochs_per_lr(12, optim) = [(0.1, 7), (0.01, 3), (0.001, 2)]; issue 21
# corrected this line, which said 8/3/1, the paper-text reading; the prediction below was
# written with 8/3/1 in mind and is left as it was), about 1,900 steps in all, precision
# auto (tf32). The report prints the epochs per lr the run really had.
# Reasoning: a CIFAR ResNet at lr 0.1 with batch 128 reaches roughly 65-72 % test accuracy after
# ~1,200 steps (these are ~3.4 epochs' worth of the full 45k set), noisy from epoch to epoch;
# the first lr drop typically adds 8-10 points at once. Stochastic depth slows the early
# epochs a little, 20k instead of 45k images costs a few points, and the JPEG re-encoding
# (quality ~75) about 1-2. So the final test error should be about 22 %, and we count
# 17-28 % as the prediction holding. A result far outside says the GPU path trains wrongly
# (or that this estimate is off; the report states which it was, not a retuned prediction).
PREDICTED_ERROR=22
PREDICTED_LOW=17
PREDICTED_HIGH=28

if ((SMOKE)); then
    PY=${PYTHON:-$REPO/.venv/bin/python}
    DEVICE=cpu
    BENCH=(--sections sd --depth 8 --batch-size 16 --steps 1 --repeats 2 --warmup 1 --threads 1)
    TRAIN_A=(depth=8 pL=0.5 epochs=2 max_steps_per_epoch=2 batch_size=16 eval_batch_size=64 dataset.val_size=6)
    TRAIN_B=(depth=8 pL=0.5 epochs=3 "optim.milestones=[1,2]" max_steps_per_epoch=2 batch_size=16
             eval_batch_size=64 dataset.val_size=6)
    export OMP_NUM_THREADS=1
else
    PY=${PYTHON:-python3}
    DEVICE=cuda
    BENCH=(--sections sd --depth 110 --batch-size 128 --steps 10 --repeats 5 --warmup 3)
    # 10 untimed steps per configuration: a branch is captured the first time it runs, and at
    # p_L 0.5 the last blocks sit out 3 steps in a row with probability 1/8 (captures would then
    # land in the timed steps); after 10, about 0.005 branches of the 54 are left uncaptured.
    GRAPHS=(--speed eager,graphs --depth 110 --batch-size 128 --steps 10 --repeats 4 --compile-warmup 10)
    TRAIN_A=(depth=110 pL=0.5 epochs=2)
    TRAIN_B=(depth=110 pL=0.5 epochs=12 "optim.milestones=[8,11]")
fi
RUNS=$WORK/runs
mkdir -p "$RUNS"
: > "$WORK/steps.tsv"
echo "gpu_acceptance: $( ((SMOKE)) && echo cpu-smoke || echo gpu ) mode, out $OUT_DIR, work $WORK, $(date -u +%FT%TZ)"
((SMOKE)) || echo "gpu_acceptance: $verdict"

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
    # Its output also goes to WORK/NAME.log (the report reads pytest's from there when a
    # timeout kept pytest from writing its junit file).
    (cd "$WORK" && timeout --kill-after=5 "$limit" "$@") 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" "$limit"
    echo "---- $name: exit $rc"
    return 0
}

report() {  # both reports from what has finished; atomic, so a kill mid-write keeps the last
    local extra=()
    ((SMOKE)) || extra=(--stamp "$BUNDLE/STAMP")
    timeout 60 "$PY" "$REPO/scripts/gpu_report.py" --work "$WORK" --out "$OUT_DIR" \
        --mode "$( ((SMOKE)) && echo cpu-smoke || echo gpu )" \
        --predicted "$PREDICTED_ERROR" "$PREDICTED_LOW" "$PREDICTED_HIGH" --elapsed "$(( $(date +%s) - START ))" \
        --train-a "${TRAIN_A[*]}" --train-b "${TRAIN_B[*]}" --expect-steps "$(plan_steps)" "${extra[@]}" \
        || echo "gpu_acceptance: report failed (exit $?)"
}

# ---- install (GPU mode), data: the wheels, the images, the installed sdrun importable
if ((SMOKE)); then
    skip install "cpu-smoke runs the interpreter's own sdrun"
else
    SITE=$WORK/site
    step install "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
cp -r "$REPO/tests" "$REPO/pyproject.toml" "$WORK/"
if [[ $DATA == *.zip ]]; then
    DATA_DIR=$WORK/cifar10
else
    DATA_DIR=$(cd "$DATA" 2>/dev/null && pwd) || DATA_DIR=$DATA  # a missing folder: train_* fail and say so
fi
step data "$PY" -c "
import sys, zipfile
import sdrun, sdrun.conf
print('sdrun from', sdrun.__file__)
src, dst = sys.argv[1:]
if src.endswith('.zip'):
    with zipfile.ZipFile(src) as z:
        z.extractall(dst)
        print('unpacked', len(z.namelist()), 'files of', src)
else:
    print('images from', src)
" "$DATA" "$DATA_DIR"
report

# ---- pytest: the CUDA tests of both files, compile excluded (it has a step of its own, last)
TEST_FILES=(tests/test_cuda.py tests/test_cuda_speed.py)  # this order: test_cuda.py's no-sync tests first
step pytest "$PY" -m pytest -v -m cuda -k "not compile" -p no:cacheprovider --junitxml="$WORK/pytest.xml" \
    "${TEST_FILES[@]}"
report

# ---- the eager bench, once per precision; each writes its report as soon as it ends
for p in tf32 bf16 fp32; do
    if ((SMOKE)) && [[ $p == tf32 ]]; then
        skip bench_tf32 "needs CUDA (TF32 is a CUDA math mode)"
    else
        step "bench_$p" "$PY" -m sdrun bench --device "$DEVICE" --precision "$p" "${BENCH[@]}" --out "$WORK/bench_$p.json"
    fi
    report
done

# ---- eager vs CUDA graphs
if ((SMOKE)); then
    skip graphs "needs CUDA (speed=graphs captures CUDA graphs)"
else
    step graphs "$PY" -m sdrun bench --device cuda "${GRAPHS[@]}" --out "$WORK/speed_graphs.json"
fi
report

# ---- training on the real CIFAR-10 images, through the whole trainer
COMMON=(dataset=cifar10 "dataset.root=$DATA_DIR" device="$DEVICE" progress=off)
step train_a "$PY" -m sdrun train "${COMMON[@]}" "${TRAIN_A[@]}" "hydra.run.dir=$RUNS/a_epochs"
report
step train_b "$PY" -m sdrun train "${COMMON[@]}" "${TRAIN_B[@]}" "hydra.run.dir=$RUNS/b_short_schedule"
report

# ---- compile, last, in whatever time is left
step compile "$PY" -m pytest -v -m cuda -k compile -p no:cacheprovider --junitxml="$WORK/pytest_compile.xml" \
    "${TEST_FILES[@]}"

# ---- the report, and the small raw files in one archive (OUT_DIR holds at most 8 files)
report
(cd "$WORK" && find runs \( -name results.json -o -name metrics.jsonl -o -name evals.jsonl -o -name train.log \
    -o -name config.yaml -o -name overrides.yaml \) -print0 > files.list
 find . -maxdepth 1 \( -name 'bench_*.json' -o -name 'speed_*.json' -o -name 'pytest*.xml' -o -name steps.tsv \
    -o -name env.json \) -print0 >> files.list
 tar --null -czf "$OUT_DIR/runs.tar.gz" -T files.list)
echo "gpu_acceptance: done in $(( $(date +%s) - START )) s; $(ls "$OUT_DIR" | wc -l) files in $OUT_DIR"
# The work folder (35k unpacked images) is left on the lent machine, which is discarded anyway:
# deleting it there would only spend device time. Elsewhere it is removed.
((SMOKE)) && rm -rf "$WORK"
exit 0
