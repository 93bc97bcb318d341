#!/usr/bin/env bash
# Fig. 3: test error and training loss against epoch, constant vs stochastic depth, CIFAR-10+
# and CIFAR-100+ (ResNet-110), from Table 1's runs (trained here if absent), then `sdrun plot`.
# Time on one GPU (an estimate, unmeasured here): none if scripts/table1.sh ran; else about
# 216 TITAN X hours (2 datasets x 3 seeds x constant + stochastic), several times less on a
# modern GPU. Add seed=1 to train one seed only.
cd "$(dirname "$0")/.."
source scripts/_sweep.sh
sweep table1_cifar10 "$@"
sweep table1_cifar100 "$@"
"$SDRUN" plot "$RUNS/table1_cifar10" "$RUNS/table1_cifar100" --out "$OUT/fig3"
