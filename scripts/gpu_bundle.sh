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
#   gpu_bundle/STAMP     what the wheel was built from (issue 21): the commit, a dirty flag
#                        (tracked files changed since it) and source_sha256, a hash of the files
#                        the sdrun wheel is made of (sdrun/, conf/, pyproject.toml). The GPU
#                        machine gets the working tree without .git, so the scripts there check
#                        the hash, which needs only sha256sum: scripts/gpu_acceptance.sh and
#                        scripts/gpu_speed.sh refuse (exit 2, one line) a bundle whose hash is
#                        not the checkout's, i.e. a stale sdrun wheel would be tested silently.
#
# Usage: scripts/gpu_bundle.sh            (make gpu-bundle)
#   PYTHON=...           interpreter with pip (default .venv/bin/python)
#   CIFAR_ZIP=...        the CIFAR-10 JPEG zip (default ../shared/data/cifar10-jpeg.zip)
#   TRAIN_PER_CLASS=N    training images per class (default 2500)
# Needs PyPI (pip download); prints the bundle's size at the end.
#        scripts/gpu_bundle.sh --stamp DIR   write DIR/STAMP for this checkout (nothing else)
#        scripts/gpu_bundle.sh --check DIR   exit 0 if DIR/STAMP matches this checkout's sources,
#                                            else one line on stderr and exit 2 (no git needed)
set -euo pipefail
cd "$(dirname "$0")/.."

# The hash of the sources the sdrun wheel is built from: sha256 of the sorted list of
# "sha256  path" lines of every file under sdrun/ and conf/ (bytecode caches aside) and of
# pyproject.toml. A file list from find, not git ls-files: the GPU side has no .git; an
# untracked file travels there too (the device tool copies untracked, not-ignored files), so
# both sides hash the same set. LC_ALL=C: one sort order everywhere.
source_sha256() {
    { find sdrun conf -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0; printf 'pyproject.toml\0'; } \
        | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

stamp_text() {  # the STAMP's lines for the checkout as it is now
    local commit=unknown dirty=unknown
    if git rev-parse --git-dir >/dev/null 2>&1; then
        commit=$(git rev-parse HEAD)
        # Tracked files only: untracked files outside sdrun/ and conf/ (run folders, notes)
        # do not change the wheel; inside them the source hash sees them anyway.
        dirty=$([ -n "$(git status --porcelain --untracked-files=no)" ] && echo 1 || echo 0)
    fi
    printf 'commit=%s\ndirty=%s\nsource_sha256=%s\nbuilt=%s\n' "$commit" "$dirty" "$(source_sha256)" \
        "$(date -u +%FT%TZ)"
}

check_stamp() {  # check_stamp DIR: the one-line verdict; exit status 0 (matches) or 2
    local stamp=$1/STAMP want have commit dirty
    if [ ! -f "$stamp" ]; then
        echo "no $stamp: build the bundle with make gpu-bundle (scripts/gpu_bundle.sh) before the GPU call" >&2
        return 2
    fi
    want=$(sed -n 's/^source_sha256=//p' "$stamp")
    commit=$(sed -n 's/^commit=//p' "$stamp")
    dirty=$(sed -n 's/^dirty=//p' "$stamp")
    have=$(source_sha256)
    if [ "$want" != "$have" ]; then
        echo "stale bundle: $stamp was built from other sdrun sources (commit ${commit:0:12}$([ "$dirty" = 1 ] && echo ', dirty'), source_sha256 ${want:0:12}, this checkout ${have:0:12}): run make gpu-bundle again" >&2
        return 2
    fi
    echo "bundle matches this checkout: source_sha256 ${have:0:12}, built from commit ${commit:0:12}$([ "$dirty" = 1 ] && echo ' with uncommitted changes')"
}

case ${1:-} in
    --stamp) mkdir -p "${2:?--stamp needs a folder}"; stamp_text > "$2/STAMP"; exit 0 ;;
    --check) check_stamp "${2:?--check needs a folder}"; exit $? ;;
    "") ;;
    *) echo "gpu_bundle: error: unknown argument $1 (use no argument, --stamp DIR or --check DIR)" >&2; exit 2 ;;
esac
PY=${PYTHON:-.venv/bin/python}
CIFAR_ZIP=${CIFAR_ZIP:-../shared/data/cifar10-jpeg.zip}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-2500}
B=gpu_bundle
LIMIT_MIB=64

[ -f "$CIFAR_ZIP" ] || { echo "gpu_bundle: error: $CIFAR_ZIP not found (set CIFAR_ZIP=...)" >&2; exit 2; }
# Taken before the wheel is built from the same files (an edit during the build then makes
# the stamp disagree with the checkout, and the GPU side refuses, rather than the reverse).
STAMP_TEXT=$(stamp_text)
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

printf '%s\n' "$STAMP_TEXT" > "$B/STAMP"  # last: a stamp vouches for a finished bundle
ls -l "$B/wheels"
sed 's/^/gpu_bundle: /' "$B/STAMP"
bytes=$(du -sb "$B" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "gpu_bundle: $(( bytes / 1024 / 1024 )) MiB ($bytes bytes); with the tracked files ($(( tree / 1024 )) KiB)" \
     "$(( (bytes + tree) / 1024 / 1024 )) MiB of the ${LIMIT_MIB} MiB that may travel"
if (( bytes + tree > LIMIT_MIB * 1024 * 1024 * 9 / 10 )); then
    echo "gpu_bundle: error: too close to the ${LIMIT_MIB} MiB limit; lower TRAIN_PER_CLASS" >&2
    exit 1
fi
