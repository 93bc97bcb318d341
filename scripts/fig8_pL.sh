#!/usr/bin/env bash
# Fig. 8 left: CIFAR-10+ test error against pL in {0.1, ..., 1.0}, linear decay vs uniform,
# ResNet-110, one seed, then `sdrun plot`.
# Time on one GPU (an estimate, unmeasured here): the 20 runs cost about 13 constant-depth
# runs (a run's time scales with its expected depth), about 270 TITAN X hours at the paper's
# 20.7 h per run; several times less on a modern GPU.
cd "$(dirname "$0")/.."
source scripts/_sweep.sh
sweep fig8_pL_sweep "$@"
"$SDRUN" plot "$RUNS/fig8_pL_sweep" --out "$OUT/fig8_pL"
