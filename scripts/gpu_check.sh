#!/usr/bin/env bash
# The prepared GPU check of issue 8, for one H200 (or any CUDA GPU), about 5-8 minutes:
#   - ResNet-110, batch 128, synthetic CIFAR-shaped data: eager vs per-branch torch.compile,
#     p_L = 1.0 vs 0.5 linear: images/s and the projected time of 500 CIFAR epochs (45k images)
#   - the SD saving (step-time ratio beside the theoretical 0.746), eval images/s, peak memory
#   - trainer overhead: real sdrun.train epochs vs a bare loop, with the number of host syncs
#     torch.cuda's sync debug mode reports during two epochs (it should be a few per epoch,
#     not one per step)
#   - ResNet-1202 step ratio and eval
# Everything goes to OUT_DIR/bench_gpu.json and OUT_DIR/bench_gpu.log.
#
# Usage: scripts/gpu_check.sh [OUT_DIR]     (PYTHON=... to use another interpreter than .venv's)
# Needs a CUDA build of torch (and triton for the compiled runs); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_out}}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT_DIR"

"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(),
      "bf16", torch.cuda.is_bf16_supported())
PY

# One process, configurations interleaved. The sections run cheapest-first and the JSON is
# rewritten after each, so a timeout still leaves the finished sections behind.
timeout 480 "$PY" -m sdrun bench --device cuda \
    --sections sd,overhead,eval,compile,deep \
    --steps 40 --repeats 5 --warmup 10 --compile-warmup 40 \
    --trainer-steps 9 --trainer-repeats 5 \
    --eval-images 10000 --eval-batch-size 500 \
    --deep-steps 10 --deep-repeats 3 \
    --out "$OUT_DIR/bench_gpu.json" 2>&1 | tee "$OUT_DIR/bench_gpu.log"
