"""Shared helpers: run the real console script (in a subprocess, or its main() in this
process), compose configs and train in this process, write small datasets in real on-disk
formats.

A subprocess costs seconds of start-up (importing torch); tests use one only for what only
a real process proves: signals and kills, torchrun, sweeps' launchers, the installed console
script, the TensorBoard server.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import io
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# One intra-op thread per test process (set before torch is imported, inherited by every
# subprocess): make test runs a pytest worker per core and each starts training processes,
# so torch's default of a thread per core would oversubscribe the cores (on 2 cores the
# suite took 6:00 with the default and 4:43 with this, docs/test-suite-2026-11-30.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sdrun.rundir import read_jsonl  # noqa: E402, F401 (the tests read runs with the run directory's own reader)

SDRUN = str(Path(sys.executable).with_name("sdrun"))

# The smallest real training run: ResNet-8 (L = 3 blocks) on the digits, a few steps.
TINY = ["dataset=digits", "depth=8", "epochs=2", "optim.milestones=[]", "max_steps_per_epoch=3", "batch_size=32",
        "eval_batch_size=512", "checkpoint=false"]
# The tiny run of the shared console_runs fixture: seed 2, an lr drop after epoch 1, a checkpoint.
# lr drop after epoch 1: under the reference's epoch counting (the default optim.epoch_base=one)
# the lr drops at the epoch numbered 2
CONSOLE_RUN = [*TINY, "seed=2", "optim.milestones=[2]", "checkpoint=true"]


def run_sdrun(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run([SDRUN, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@dataclass
class Result:
    """What a run of `sdrun ...` left: like subprocess.CompletedProcess."""
    returncode: int
    stdout: str
    stderr: str


def sdrun_main(*args: str, cwd: Path) -> Result:
    """`sdrun ARGS` in this process: the console script's own main(), its exit code and output.

    The same code path as run_sdrun without a process's start-up; the process-wide state
    that the CLI and Hydra change (argv, HYDRA_FULL_ERROR, the working directory, logging
    handlers) is put back afterwards.
    """
    from sdrun import cli

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env, saved_cwd = sys.argv[:], os.environ.get("HYDRA_FULL_ERROR"), os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), global_state_kept():
            try:
                cli.main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        sys.argv[:] = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
        for handler in root.handlers[:]:  # Hydra's job logging (train.log): close and detach it
            if handler not in saved_handlers:
                handler.close()
                root.removeHandler(handler)
        for handler in saved_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved_level)
    return Result(code, out.getvalue(), err.getvalue())


def compose_cfg(*overrides: str) -> DictConfig:
    """The config `sdrun train OVERRIDES` would run, composed by Hydra's compose API."""
    from sdrun.launch.compose import compose

    return compose(*overrides)


@contextlib.contextmanager
def global_state_kept():
    """Put back the process-wide torch/NumPy/Python state a training run sets (seeds,
    threads, deterministic algorithms), so in-process runs leak nothing into other tests."""
    import torch  # not at the top: pytest-xdist's controller loads this file and runs no test

    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    benchmark = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark = benchmark


def train_in_process(run_dir: Path, *overrides: str) -> dict:
    """sdrun.launch.app.train on the composed config: the trainer without the CLI and Hydra's
    run directory handling (no .hydra/, no train.log). Returns results.json's content."""
    from sdrun.launch.app import train

    cfg = compose_cfg(*overrides)
    with global_state_kept():
        return train(cfg, run_dir)


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


def write_svhn_mats(root: Path, per_class=(6, 4, 2), seed: int = 0) -> Path:
    """train_32x32.mat, extra_32x32.mat, test_32x32.mat in SVHN's format (scipy.io, MATLAB v5):
    X uint8 (32, 32, 3, N), y (N, 1) with label 10 for the digit 0.

    Every image carries its digit in pixel (row 0, col 0, channel 0), its file (0 train,
    1 extra, 2 test) in (row 0, col 1, channel 0) and a marker 255 at (row 1, col 2,
    channel 1), so a reader's label mapping, provenance and axis order can be checked.
    """
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for source, (name, n) in enumerate(zip(("train", "extra", "test"), per_class)):
        digits = rng.permutation(np.repeat(np.arange(10), n))
        x = rng.integers(0, 200, (32, 32, 3, len(digits)), dtype=np.uint8)
        x[0, 0, 0, :] = digits
        x[0, 1, 0, :] = source
        x[1, 2, 1, :] = 255
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
        savemat(root / f"{name}_32x32.mat", {"X": x, "y": y})
    return root


def write_imagenet_folder(root: Path, wnids=("n01440764", "n01443537", "n01484850"), per_class=(5, 2),
                          seed: int = 0) -> Path:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG: real JPEGs of assorted sizes, as ImageNet is laid out."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for wnid in wnids:
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(40, 72, 2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{wnid}_{i}.JPEG", format="JPEG")
    return root


def made_once(tmp_path_factory, name: str, make) -> Path:
    """make(folder) once per test session, even with pytest-xdist's workers: they share the
    session's temporary root (the parent of each worker's own), so the first worker to get
    the lock makes the folder and the others reuse it (the recipe in pytest-xdist's docs)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (root / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def console_runs(tmp_path_factory) -> Path:
    """Real `sdrun train` runs shared by several test files (read-only), in one TensorBoard log dir:
    logs/run      a tiny run (seed 2, lr drop after epoch 1, checkpoint on), through the CLI's main()
    logs/sweep/N  a two-job multirun sweep over pL = 0.5, 1.0, in a real `sdrun train -m` process
    """
    def make(root: Path) -> None:
        logs = root / "logs"
        r = sdrun_main("train", *CONSOLE_RUN, f"hydra.run.dir={logs}/run", cwd=root)
        assert r.returncode == 0, r.stderr
        r = run_sdrun("train", "-m", *TINY, "pL=0.5,1.0", f"hydra.sweep.dir={logs}/sweep", cwd=root)
        assert r.returncode == 0, r.stderr

    return made_once(tmp_path_factory, "console", make) / "logs"


def pytest_sessionfinish(session) -> None:
    # A worker that imported torch spends 1-2 s at exit in the interpreter's last garbage
    # collection; freezing the heap skips it, as `sdrun` itself does (sdrun.cli.console_script).
    gc.freeze()
