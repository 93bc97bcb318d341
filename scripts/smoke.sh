#!/usr/bin/env bash
# Every table and figure in miniature on a CPU, to try the pipeline: the smoke preset (ResNet-8
# on the embedded digits, a few steps), plus a small pL x survival x depth grid for Fig. 8.
# Numbers from it mean nothing. About 1 minute on 2 idle CPU cores.
cd "$(dirname "$0")/.."
RUNS=${RUNS:-multirun/smoke}
OUT=${OUT:-paper_results/smoke}
source scripts/_sweep.sh
sweep smoke "$@"
RUNS="$RUNS/fig8" sweep smoke pL=0.25,0.5,0.75,1.0 survival=linear,uniform depth=8,14 seed=1 "$@"
"$SDRUN" table "$RUNS" --out "$OUT"
"$SDRUN" plot "$RUNS" --out "$OUT"
