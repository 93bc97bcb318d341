#!/usr/bin/env bash
# Here-side step of the GPU acceptance run (scripts/gpu_acceptance.sh): fills the ignored
# folder gpu_bundle/ with what the bare H200 machine lacks, so that it travels with one
# `carry: ["gpu_bundle"]` (the checkout plus carried paths: 64 MiB at most).
#
#   gpu_bundle/wheels/   hydra-core, omegaconf (py3 wheels from PyPI, the versions installed
#                        in .venv so the GPU runs what the tests here ran), antlr4-python3-runtime
#                        4.9.3 (an sdist only on PyPI: its pure-Python wheel is built here), and
#                        sdrun's own wheel (its config tree inside, as from any wheel install)
#   gpu_bundle/cifar10-subset.zip
#                        TRAIN_PER_CLASS (2500) training images per class and the whole 10,000-
#                        image test split of ../shared/data/cifar10-jpeg.zip, the JPEG bytes
#                        copied unchanged (no re-encoding: the same pixels as the shared data),
#                        stored uncompressed in the image-folder layout sdrun reads
#                        (train/<class>/*.jpg, test/<class>/*.jpg); the GPU side unzips it.
#                        The full zip (62 MiB) would not fit beside the rest.
#
# Usage: scripts/gpu_bundle.sh            (make gpu-bundle)
#   PYTHON=...           interpreter with pip (default .venv/bin/python)
#   CIFAR_ZIP=...        the CIFAR-10 JPEG zip (default ../shared/data/cifar10-jpeg.zip)
#   TRAIN_PER_CLASS=N    training images per class (default 2500)
# Needs PyPI (pip download); prints the bundle's size at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CIFAR_ZIP=${CIFAR_ZIP:-../shared/data/cifar10-jpeg.zip}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-2500}
B=gpu_bundle
LIMIT_MIB=64

[ -f "$CIFAR_ZIP" ] || { echo "gpu_bundle: error: $CIFAR_ZIP not found (set CIFAR_ZIP=...)" >&2; exit 2; }
rm -rf "$B"
mkdir -p "$B/wheels"

# The versions this checkout is tested with.
read -r HYDRA OMEGACONF ANTLR < <("$PY" -c "import importlib.metadata as m; print(*(m.version(n) for n in
    ('hydra-core', 'omegaconf', 'antlr4-python3-runtime')))")
# Pure-Python wheels (py3-none-any); the platform flags keep pip from picking anything that
# would not install under the H200 machine's CPython 3.12 on x86-64.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$B/wheels" "hydra-core==$HYDRA" "omegaconf==$OMEGACONF"
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 pins) exists on PyPI as an sdist only.
"$PY" -m pip wheel -q --no-deps -w "$B/wheels" "antlr4-python3-runtime==$ANTLR"
"$PY" -m pip wheel -q --no-deps -w "$B/wheels" .  # isolated build: setuptools + wheel from PyPI
rm -rf build  # setuptools' scratch folder from the sdrun wheel

"$PY" - "$CIFAR_ZIP" "$B/cifar10-subset.zip" "$TRAIN_PER_CLASS" <<'PY'
import sys
import zipfile
from collections import defaultdict

src, dst, per_class = sys.argv[1], sys.argv[2], int(sys.argv[3])
with zipfile.ZipFile(src) as zin:
    names = sorted(n for n in zin.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
    by_class = defaultdict(list)
    for n in names:
        split, cls = n.split("/")[:2]
        by_class[split, cls].append(n)
    keep = [n for (split, cls), files in sorted(by_class.items())
            for n in (files[:per_class] if split == "train" else files)]
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for n in keep:
            info = zipfile.ZipInfo(n, date_time=(2019, 3, 31, 0, 0, 0))  # fixed: same bytes every time
            zout.writestr(info, zin.read(n))
counts = defaultdict(int)
for n in keep:
    counts[n.split("/")[0]] += 1
classes = sorted({cls for _, cls in by_class})
print(f"cifar10-subset.zip: {counts['train']} train + {counts['test']} test images, {len(classes)} classes")
PY

ls -l "$B/wheels"
bytes=$(du -sb "$B" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "gpu_bundle: $(( bytes / 1024 / 1024 )) MiB ($bytes bytes); with the tracked files ($(( tree / 1024 )) KiB)" \
     "$(( (bytes + tree) / 1024 / 1024 )) MiB of the ${LIMIT_MIB} MiB that may travel"
if (( bytes + tree > LIMIT_MIB * 1024 * 1024 * 9 / 10 )); then
    echo "gpu_bundle: error: too close to the ${LIMIT_MIB} MiB limit; lower TRAIN_PER_CLASS" >&2
    exit 1
fi
