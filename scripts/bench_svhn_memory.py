"""Host memory of loading SVHN: peak resident memory over the size of the uint8 training set.

Writes SVHN-format .mat files (scipy.io, random pixels) of the requested size into a
temporary folder, then, in a fresh process, loads them with sdrun's reader and fits the
normaliser, as `sdrun train dataset=svhn` does before moving the data to the device.
The reader keeps uint8 throughout: the peak is the two .mat files as loaded plus one copy
of the training images (ratio about 2); a float copy of the set would add 4 more.

    .venv/bin/python scripts/bench_svhn_memory.py                 # 100k extra images (about 1 min)
    .venv/bin/python scripts/bench_svhn_memory.py --extra 531131  # the real size (about 4 GB of RAM)
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write(root: Path, train: int, extra: int, test: int) -> None:
    import numpy as np
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for name, n in (("train", train), ("extra", extra), ("test", test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8)[:, None]  # 1..10, 10 = the digit 0
        savemat(root / f"{name}_32x32.mat", {"X": x, "y": y})
        del x


def measure(root: Path) -> None:
    from omegaconf import OmegaConf

    from sdrun.data.batches import Normalizer
    from sdrun.data.readers import load_image_data

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    t0 = time.perf_counter()
    cfg = OmegaConf.create({"name": "svhn", "root": str(root), "download": False, "check_md5": False,
                            "num_classes": 10, "val_per_class": [400, 200]})
    data = load_image_data(cfg, seed=1)
    t_load = time.perf_counter() - t0
    Normalizer.fit(data.train.images)
    t_total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train_bytes = data.train.images.numel()
    print(f"train {len(data.train)} / val {len(data.val)} / test {len(data.test)} images, "
          f"uint8 training set {train_bytes / 2**30:.2f} GiB")
    print(f"load {t_load:.1f} s, load + normaliser {t_total:.1f} s")
    print(f"peak RSS above the imports {(peak - base) / 2**30:.2f} GiB = "
          f"{(peak - base) / train_bytes:.2f} x the uint8 training set")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=73257)
    ap.add_argument("--extra", type=int, default=100000)
    ap.add_argument("--test", type=int, default=26032)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(args.measure)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), args.train, args.extra, args.test)
        subprocess.run([sys.executable, __file__, "--measure", tmp], check=True)


if __name__ == "__main__":
    main()
