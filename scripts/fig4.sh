#!/usr/bin/env bash
# Fig. 4: test error against epoch, constant vs stochastic depth, on SVHN (ResNet-152) and for
# ResNet-1202 on CIFAR-10+, then `sdrun plot` (fig4.png/.pdf: one panel per setting; the same
# runs also give Figs. 3 and 7 for those settings).
# Time on one GPU (an estimate, unmeasured here): SVHN, one seed (seed=1 is passed here), about
# 59 TITAN X hours (Table 2: 33 h 43 m constant + 25 h 33 m stochastic), none if scripts/table1.sh
# ran; ResNet-1202 (2 runs, 300 epochs) about 240 TITAN X hours. A modern GPU with bf16 is several
# times faster.
cd "$(dirname "$0")/.."
source scripts/_sweep.sh
if [[ -e "$RUNS/table1_svhn" ]]; then
  svhn="$RUNS/table1_svhn"
else
  RUNS="$RUNS/fig4" sweep table1_svhn seed=1 "$@"
  svhn="$RUNS/fig4/table1_svhn"
fi
sweep resnet1202 "$@"
"$SDRUN" plot "$svhn" "$RUNS/resnet1202" --out "$OUT/fig4"
