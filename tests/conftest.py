"""Shared helpers: run the real console script, write small datasets in real on-disk formats."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SDRUN = str(Path(sys.executable).with_name("sdrun"))

# The smallest real training run: ResNet-8 (L = 3 blocks) on the digits, a few steps.
TINY = ["dataset=digits", "depth=8", "epochs=2", "max_steps_per_epoch=3", "batch_size=32",
        "eval_batch_size=512", "checkpoint=false"]


def run_sdrun(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run([SDRUN, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_cifar_pickles(root: Path, num_classes: int = 10, per_batch: int = 20, test: int = 30,
                        seed: int = 0) -> Path:
    """CIFAR-10/100 in torchvision's on-disk format: Python pickles of uint8 rows of 3072 bytes."""
    rng = np.random.default_rng(seed)
    if num_classes == 10:
        folder, label_key = root / "cifar-10-batches-py", "labels"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file, meta = "test_batch", "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder, label_key = root / "cifar-100-python", "fine_labels"
        train_files, test_file = ["train"], "test"
        meta_file, meta = "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                                   "coarse_label_names": [f"s{i}" for i in range(20)]}
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        labels = rng.integers(0, num_classes, n).tolist()
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        out = {"batch_label": "fixture", "data": data, label_key: labels,
               "filenames": [f"img{i}.png" for i in range(n)]}
        if num_classes == 100:
            out["coarse_labels"] = [label // 5 for label in labels]
        return out

    for name in train_files:
        with open(folder / name, "wb") as f:
            pickle.dump(batch(per_batch if num_classes == 10 else 5 * per_batch), f)
    with open(folder / test_file, "wb") as f:
        pickle.dump(batch(test), f)
    with open(folder / meta_file, "wb") as f:
        pickle.dump(meta, f)
    return root


def write_image_folder(root: Path, classes=("cat", "dog", "ship"), per_class=(6, 3), size=32,
                       ext="png", seed: int = 0) -> Path:
    """train/<class>/*.png and test/<class>/*.png, as cifar2png-style exports lay them out."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.{ext}")
    return root


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    return write_cifar_pickles(tmp_path / "cifar10")
