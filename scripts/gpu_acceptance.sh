#!/usr/bin/env bash
# Everything a GPU can tell us about sdrun, in one run of at most 5 minutes (issue 12).
#
#   scripts/gpu_acceptance.sh OUT_DIR [--cpu-smoke] [--data ZIP_OR_DIR]
#
# On the H200 machine (bare: python3 with torch, no hydra/omegaconf/antlr, no network),
# after scripts/gpu_bundle.sh filled gpu_bundle/ here and the call carried it:
#   0. installs gpu_bundle/wheels/*.whl (hydra-core, omegaconf, antlr4, sdrun) into a temp
#      target without dependencies; sdrun runs from that wheel (its config tree as packaged),
#      from a work folder outside the checkout so the checkout's sources cannot shadow it;
#   1. pytest -m cuda (tests/test_cuda.py, run against the installed wheel);
#   2. sdrun bench --device cuda --sections compile, once per precision (tf32, bf16, fp32):
#      ResNet-110, batch 128, p_L 1.0 vs 0.5, eager vs per-branch compile: images/s, the SD
#      step ratio, peak GPU memory, the projected time of 500 CIFAR epochs;
#   3. sdrun train on the real CIFAR-10 images of gpu_bundle/cifar10-subset.zip:
#      a. ResNet-110 p_L = 0.5, 3 epochs: seconds per epoch through the whole trainer
#         (data, augmentation, statistics, evaluation, checkpoints, logging);
#      b. a short schedule whose test error is predicted below, before it runs;
#   4. OUT_DIR/gpu_report.md and gpu_report.json (GPU, driver, torch/CUDA/cuDNN versions,
#      every figure), rewritten after every step, so a timeout leaves the finished parts.
# OUT_DIR ends with at most 4 files: gpu_report.md, gpu_report.json, acceptance.log and
# runs.tar.gz (the training runs' results.json, metrics.jsonl, train.log, config).
#
# --cpu-smoke: the same steps with tiny sizes on the CPU (device=cpu, ResNet-8, a few steps,
# precisions fp32 and bf16, the bench's eager `sd` section instead of `compile`, no wheel
# step: the interpreter's own sdrun). CI runs it (tests/test_gpu_acceptance.py) so that this
# script cannot rot between GPU runs. --data: a CIFAR-10 image-folder root, or a zip of one
# (default gpu_bundle/cifar10-subset.zip). PYTHON=...: the interpreter (default python3 on
# the GPU, .venv/bin/python in smoke mode).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${1:?usage: scripts/gpu_acceptance.sh OUT_DIR [--cpu-smoke] [--data ZIP_OR_DIR]}
shift
SMOKE=0
DATA=$REPO/gpu_bundle/cifar10-subset.zip
while (($#)); do
    case $1 in
        --cpu-smoke) SMOKE=1 ;;
        --data) DATA=${2:?--data needs a path}; shift ;;
        *) echo "gpu_acceptance: error: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sdrun_gpu.XXXXXX")
LOG=$OUT_DIR/acceptance.log
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
export PYTHONUNBUFFERED=1

# ---- the prediction for step 3b, written down before any GPU run (issue 12).
# ResNet-110, p_L = 0.5 linear, 20,000 training images (25,000 of the subset less the 5,000
# held out for validation), batch 128 = 157 steps per epoch; 12 epochs: lr 0.1 for 8, 0.01 for 3,
# 0.001 for 1 (milestones 8, 11), about 1,900 steps in all, precision auto (tf32).
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
    PRECISIONS="fp32 bf16"
    BENCH=(--sections sd --depth 8 --batch-size 16 --steps 1 --repeats 2 --warmup 1 --threads 1)
    TRAIN_A=(depth=8 pL=0.5 epochs=2 max_steps_per_epoch=2 batch_size=16 eval_batch_size=64 dataset.val_size=6)
    TRAIN_B=(depth=8 pL=0.5 epochs=3 "optim.milestones=[1,2]" max_steps_per_epoch=2 batch_size=16
             eval_batch_size=64 dataset.val_size=6)
    T_PYTEST=60 T_BENCH=60 T_TRAIN_A=60 T_TRAIN_B=60 DEADLINE=600
    export OMP_NUM_THREADS=1
else
    PY=${PYTHON:-python3}
    DEVICE=cuda
    PRECISIONS="tf32 bf16 fp32"
    BENCH=(--sections compile --depth 110 --batch-size 128 --steps 15 --repeats 5 --warmup 5 --compile-warmup 20)
    TRAIN_A=(depth=110 pL=0.5 epochs=3)
    TRAIN_B=(depth=110 pL=0.5 epochs=12 "optim.milestones=[8,11]")
    # 5 minutes in all (so a second run plus the machine's start fit the 15-minute lease):
    # each step has its own limit, and none may run past DEADLINE seconds from the start
    # (a step with under 10 s left is skipped and reported so). Most valuable first: the
    # tests, the default precision's bench, the training runs, then the other precisions.
    # Expected on the H200 (estimates): tests ~60 s, a bench ~40 s (most of it compiling),
    # train a ~25 s and b ~55 s (each ~10-15 s of start: imports, decoding 35k JPEGs, cuDNN's search).
    T_PYTEST=90 T_BENCH=45 T_TRAIN_A=45 T_TRAIN_B=75 DEADLINE=285
fi
RUNS=$WORK/runs
mkdir -p "$RUNS"
echo "gpu_acceptance: $( ((SMOKE)) && echo cpu-smoke || echo gpu ) mode, out $OUT_DIR, work $WORK, $(date -u +%FT%TZ)"

step() {  # step NAME SECONDS CMD...: run with a time limit from the work folder, record rc and time
    local name=$1 limit=$2 t0 rc left
    shift 2
    left=$(( DEADLINE - ($(date +%s) - START) ))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then
        echo "---- $name: skipped, ${left}s left of the ${DEADLINE}s budget"
        printf '%s\t%s\t%s\t%s\n' "$name" -1 0 "$limit" >> "$WORK/steps.tsv"
        return 0
    fi
    t0=$(date +%s%N)
    echo "---- $name (limit ${limit}s): $*"
    # Its output also goes to WORK/NAME.log (the report reads pytest's from there when a
    # timeout kept pytest from writing its junit file).
    (cd "$WORK" && timeout --kill-after=10 "$limit" "$@") 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" "$limit" >> "$WORK/steps.tsv"
    echo "---- $name: exit $rc"
    return 0
}

report() {
    "$PY" "$REPO/scripts/gpu_report.py" --work "$WORK" --out "$OUT_DIR" --mode "$( ((SMOKE)) && echo cpu-smoke || echo gpu )" \
        --predicted "$PREDICTED_ERROR" "$PREDICTED_LOW" "$PREDICTED_HIGH" --elapsed "$(( $(date +%s) - START ))" \
        --train-a "${TRAIN_A[*]}" --train-b "${TRAIN_B[*]}" || echo "gpu_acceptance: report failed (exit $?)"
}

# ---- 0. the wheels (GPU mode), the data, the tests against the installed sdrun
if ((SMOKE)); then
    : > "$WORK/steps.tsv"
else
    SITE=$WORK/site
    : > "$WORK/steps.tsv"
    step install 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" "$REPO"/gpu_bundle/wheels/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
cp -r "$REPO/tests" "$REPO/pyproject.toml" "$WORK/"
if [[ $DATA == *.zip ]]; then
    "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$DATA" "$WORK/cifar10" \
        || { echo "gpu_acceptance: error: cannot unpack $DATA (run scripts/gpu_bundle.sh first)"; exit 2; }
    DATA_DIR=$WORK/cifar10
else
    DATA_DIR=$(cd "$DATA" && pwd) || exit 2
fi
(cd "$WORK" && "$PY" -c "import sdrun, sdrun.conf; print('sdrun from', sdrun.__file__)") || exit 2
report

# ---- 1. the CUDA tests
step pytest "$T_PYTEST" "$PY" -m pytest -v -m cuda -p no:cacheprovider --junitxml="$WORK/pytest.xml" tests/test_cuda.py
report

# ---- 2. the benchmark, once per precision (the first, the default, before the training runs)
bench() {
    step "bench_$1" "$T_BENCH" "$PY" -m sdrun bench --device "$DEVICE" --precision "$1" "${BENCH[@]}" \
        --out "$WORK/bench_$1.json"
    report
}
set -- $PRECISIONS
bench "$1"

# ---- 3. training on the real CIFAR-10 images, through the whole trainer
COMMON=(dataset=cifar10 "dataset.root=$DATA_DIR" device="$DEVICE" progress=off)
step train_a "$T_TRAIN_A" "$PY" -m sdrun train "${COMMON[@]}" "${TRAIN_A[@]}" "hydra.run.dir=$RUNS/a_epochs"
report
step train_b "$T_TRAIN_B" "$PY" -m sdrun train "${COMMON[@]}" "${TRAIN_B[@]}" "hydra.run.dir=$RUNS/b_short_schedule"
report
shift
for p in "$@"; do
    bench "$p"
done

# ---- 4. the report, and the runs' small files in one archive (OUT_DIR holds at most 8 files)
report
(cd "$RUNS" && find . \( -name results.json -o -name metrics.jsonl -o -name evals.jsonl -o -name train.log \
    -o -name config.yaml -o -name overrides.yaml \) -print0 | tar --null -czf "$OUT_DIR/runs.tar.gz" -T -)
echo "gpu_acceptance: done in $(( $(date +%s) - START )) s; $(ls "$OUT_DIR" | wc -l) files in $OUT_DIR"
# The work folder (35k unpacked images) is left on the lent machine, which is discarded anyway:
# deleting it there would only spend device time. Elsewhere it is removed.
((SMOKE)) && rm -rf "$WORK"
exit 0
