#!/usr/bin/env bash
# Fig. 7: mean |gradient| of the first block's first convolution against epoch, constant vs
# stochastic depth on CIFAR-10+, lr drops marked, then `sdrun plot`. It reads the per-block
# gradient magnitudes the trainer writes to metrics.jsonl (key grad_mean_abs); runs without
# them make `sdrun plot` skip Fig. 7 with a one-line reason.
# Time on one GPU (an estimate, unmeasured here): none if scripts/table1.sh ran with gradient
# logging; else 36 TITAN X hours for one seed (seed=1 is passed here).
cd "$(dirname "$0")/.."
source scripts/_sweep.sh
if [[ -e "$RUNS/table1_cifar10" ]]; then
  dir="$RUNS/table1_cifar10"
else
  RUNS="$RUNS/fig7" sweep table1_cifar10 seed=1 "$@"
  dir="$RUNS/fig7/table1_cifar10"
fi
"$SDRUN" plot "$dir" --out "$OUT/fig7"
