#!/usr/bin/env bash
# Table 2: training time of constant vs stochastic depth (linear decay, pL=0.5) on CIFAR-10+,
# CIFAR-100+ and SVHN, then `sdrun table` (its second table; time per epoch, training passes
# only). Reuses scripts/table1.sh's runs where they exist, else trains seed 1 of each.
# Times only compare on one otherwise idle GPU: run nothing else on it meanwhile.
# Time on one GPU (an estimate, unmeasured here): the paper's Table 2 itself, 131 TITAN X
# hours for the three pairs; several times less on a modern GPU; nothing if Table 1 ran.
cd "$(dirname "$0")/.."
source scripts/_sweep.sh
dirs=()
for preset in table1_cifar10 table1_cifar100 table1_svhn; do
  if [[ -e "$RUNS/$preset" ]]; then
    dirs+=("$RUNS/$preset")
  else
    RUNS="$RUNS/table2" sweep "$preset" seed=1 "$@"
    dirs+=("$RUNS/table2/$preset")
  fi
done
"$SDRUN" table "${dirs[@]}" --out "$OUT/table2"
