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
#
# The plan arithmetic, the step runner (limits, carry-over, deadline), argument parsing, the
# bundle check and the report plumbing are shared with call 2: scripts/gpu_steps.sh.
set -uo pipefail
START=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/scripts/gpu_steps.sh"
SCRIPT=gpu_acceptance
USAGE="usage: scripts/gpu_acceptance.sh OUT_DIR [--cpu-smoke] [--data ZIP_OR_DIR] [--bundle DIR] | --plan [--cpu-smoke]"
DATA= BUNDLE=$REPO/gpu_bundle
declare -A PATH_OPTIONS=([--data]=DATA [--bundle]=BUNDLE)
parse_args "$@"
DATA=${DATA:-$BUNDLE/cifar10-subset.zip}

# ---- the plan: the one source of every step's limit (how step() uses it: scripts/gpu_steps.sh;
# --plan prints it). Limits are estimates for the H200 (launch-bound
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

plan_or_out_dir
check_bundle
start_run sdrun_gpu acceptance.log

# ---- the prediction for step train_b, written down before any GPU run (issue 12).
# ResNet-110, p_L = 0.5 linear, 20,000 training images (25,000 of the subset less the 5,000
# held out for validation), batch 128 = 157 steps per epoch; 12 epochs, milestones 8 and 11.
# Under fidelity=reference (the default: epochs numbered from 1, the lr drops at the epoch
# numbered m, sdrun/engine/schedule.py) that is lr 0.1 for 7 epochs, 0.01 for 3, 0.001 for 2
# (sdrun.engine.schedule.epochs_per_lr(12, optim) = [(0.1, 7), (0.01, 3), (0.001, 2)]; issue 21
# corrected this line, which said 8/3/1, the paper-text reading; the prediction below was
# written with 8/3/1 in mind and is left as it was), about 1,900 steps in all, precision
# tf32 (pinned below; it was the default `auto` when the prediction was written). The report prints the epochs per lr the run really had.
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
    TRAIN_A=(depth=8 pL=0.5 epochs=2 "optim.milestones=[]" max_steps_per_epoch=2 batch_size=16 eval_batch_size=64 dataset.val_size=6)
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
    # precision=tf32 pinned: the limits above were estimated for TF32, and fidelity=reference
    # (the default) now implies fp32 (docs/fidelity.md); the fp32 path is covered by the tests
    # and the per-precision benches.
    TRAIN_A=(depth=110 pL=0.5 epochs=2 "optim.milestones=[]" precision=tf32)
    TRAIN_B=(depth=110 pL=0.5 epochs=12 "optim.milestones=[8,11]" precision=tf32)
fi
RUNS=$WORK/runs
mkdir -p "$RUNS"

report() {  # gpu_report.json and gpu_report.md from what has finished
    run_report --predicted "$PREDICTED_ERROR" "$PREDICTED_LOW" "$PREDICTED_HIGH" \
        --train-a "${TRAIN_A[*]}" --train-b "${TRAIN_B[*]}"
}

# ---- install (GPU mode), data: the wheels, the images, the installed sdrun importable
step_install  # the step install (scripts/gpu_steps.sh): the wheels; tests/ into the work folder
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
finish
