#!/usr/bin/env bash
# Fig. 8 right: CIFAR-10+ test error over pL in {0.1, ..., 1.0} and depth in {20, 32, 44, 56,
# 110}, linear decay, one seed, then `sdrun plot`.
# Time on one GPU (an estimate, unmeasured here): 50 runs; time scales with blocks x expected
# depth, about 18 ResNet-110 constant-depth runs in all, about 370 TITAN X hours; several
# times less on a modern GPU.
cd "$(dirname "$0")/.."
source scripts/_sweep.sh
sweep fig8_depth_heatmap "$@"
"$SDRUN" plot "$RUNS/fig8_depth_heatmap" --out "$OUT/fig8_heatmap"
