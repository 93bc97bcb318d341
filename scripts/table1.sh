#!/usr/bin/env bash
# Table 1: test error of constant vs stochastic depth, three seeds each, then `sdrun table`.
#   scripts/table1.sh                                   # CIFAR-10+, CIFAR-100+, SVHN
#   PRESETS="table1_cifar10 resnet1202" scripts/table1.sh
#   PRESETS=table1_imagenet scripts/table1.sh           # needs ImageNet under data/
# Time on one GPU (an estimate, unmeasured here): the paper's Table 2 gives, per seed on a
# TITAN X, 35.8 h (CIFAR-10+, constant + stochastic), 36.2 h (CIFAR-100+) and 59.3 h (SVHN),
# so about 390 TITAN X hours for the default three presets x 3 seeds; a modern GPU should be
# several times faster (not measured yet: docs/gpu/runbook.md). ResNet-1202 (2 runs): about 240 TITAN X hours. ImageNet (4 runs of
# ResNet-152, 90 and 120 epochs): weeks on one GPU.
cd "$(dirname "$0")/.."
source scripts/_sweep.sh
PRESETS=${PRESETS:-table1_cifar10 table1_cifar100 table1_svhn}
dirs=()
for preset in $PRESETS; do
  sweep "$preset" "$@"
  dirs+=("$RUNS/$preset")
done
"$SDRUN" table "${dirs[@]}" --out "$OUT/table1"
