"""Runs that survive: real subprocesses, real SIGKILL/SIGTERM, resumed to identical numbers."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sdrun.files import OutputError, atomic_write, load_checkpoint
from tests.conftest import SDRUN, read_jsonl, run_sdrun, train_in_process

RUN = ["dataset=digits", "depth=8", "epochs=4", "max_steps_per_epoch=4", "batch_size=32",
       "eval_batch_size=512"]
WALL_CLOCK = {"epoch_train_time_s", "images_per_s", "train_time_s", "train_time_per_epoch_s", "wall_time_s",
              "elapsed_s", "eta_s"}

# Runs the real trainer in a child process whose N-th checkpoint write kills the process
# with SIGKILL: before anything is written (mode "before") or after the temporary file is
# complete but before it replaces the old checkpoint (mode "during").
KILLER = textwrap.dedent("""
    import os, signal, sys
    import sdrun.files as io
    n_target, mode = int(sys.argv[1]), sys.argv[2]
    real_atomic_write, count = io.atomic_write, [0]

    def atomic_write(path, write):
        if path.name == "checkpoint.pt":
            count[0] += 1
            if count[0] == n_target:
                if mode == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                def write_then_die(f):
                    write(f)
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_atomic_write(path, write_then_die)
        return real_atomic_write(path, write)

    io.atomic_write = atomic_write
    from sdrun.cli import main
    main(["train", *sys.argv[3:]])
""")


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in WALL_CLOCK}


def outcome(run_dir: Path) -> tuple:
    metrics = [strip(r) for r in read_jsonl(run_dir / "metrics.jsonl")]
    results = strip(json.loads((run_dir / "results.json").read_text()))
    weights = load_checkpoint(run_dir / "checkpoint.pt")["model"]
    return metrics, results, weights


def assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0], "metrics.jsonl differs"
    assert a[1] == b[1], "results.json differs"
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), f"weights differ: {k}"


def resume_until_done(run_dir: Path, cwd: Path) -> None:
    r = run_sdrun("train", *RUN, f"hydra.run.dir={run_dir}", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert (run_dir / "results.json").is_file()


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory) -> Path:
    """The uninterrupted run, through the console script."""
    cwd = tmp_path_factory.mktemp("baseline")
    r = run_sdrun("train", *RUN, "hydra.run.dir=run", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "run"


@pytest.fixture(scope="module")
def baseline(baseline_dir) -> tuple:
    return outcome(baseline_dir)


# (epoch, mode): SIGKILL at that epoch's checkpoint write, before anything is written or
# after the temporary file is complete but before it replaces the old checkpoint.
KILLS = [(2, "during"), (3, "before"), (4, "during")]


def test_sigkill_at_checkpoint_writes_then_resume_is_bit_identical(tmp_path, baseline):
    """One run killed three times, each attempt resuming the last; the end result is the
    uninterrupted run's, bit for bit, and TensorBoard holds each epoch once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    for epoch, mode in KILLS:
        checkpoint = run_dir / "checkpoint.pt"
        done = load_checkpoint(checkpoint)["epoch"] if checkpoint.exists() else 0  # this attempt resumes there
        n = epoch - done  # so its n-th checkpoint write is the killed epoch's
        r = subprocess.run([sys.executable, "-c", KILLER, str(n), mode, *RUN, f"hydra.run.dir={run_dir}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == epoch - 1  # the old one is intact
        # metrics.jsonl already has the killed epoch's line, which the resume must drop.
        assert len(read_jsonl(run_dir / "metrics.jsonl")) == epoch
    resume_until_done(run_dir, tmp_path)
    assert_same(outcome(run_dir), baseline)

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("error/test")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("error/test")] == pytest.approx(
        [m["test_error_pct"] for m in read_jsonl(run_dir / "metrics.jsonl")])


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, baseline):
    rng = random.Random(1234)
    run_dir = tmp_path / "run"
    kills = 0
    for _ in range(3):
        if (run_dir / "results.json").exists():
            break
        proc = subprocess.Popen([SDRUN, "train", *RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until training has started (a metrics line or a checkpoint exists), then a random moment.
        done_lines = len(read_jsonl(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").exists() else 0
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            lines = len(read_jsonl(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").exists() else 0
            if lines > done_lines:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 1
    resume_until_done(run_dir, tmp_path)
    assert_same(outcome(run_dir), baseline)


def test_sigterm_checkpoints_exits_clearly_and_resumes_identically(tmp_path, baseline):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([SDRUN, "train", *RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "resume" in err and "Traceback" not in err
    assert not (run_dir / "results.json").exists()
    resume_until_done(run_dir, tmp_path)
    assert_same(outcome(run_dir), baseline)


def test_finished_run_is_not_run_again(tmp_path, baseline_dir):
    shutil.copytree(baseline_dir, tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    r = run_sdrun("train", *RUN, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0 and "already holds a finished run" in r.stderr
    assert before == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(tmp_path):
    # A sane first epoch (warm-up lr), then an absurd lr that blows the loss up in epoch 2.
    r = run_sdrun("train", *RUN, "optim.warmup_epochs=1", "optim.warmup_lr=0.05", "optim.lr=1e30",
                  "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 2
    assert "non-finite training loss at epoch 2, step" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "run" / "results.json").exists()


def test_atomic_write_failure_keeps_the_previous_version(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def half_then_disk_full(f):
        f.write(b"new, but only ha")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError, match="No space left on device"):
        atomic_write(target, half_then_disk_full)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_file_size_limit_during_checkpoint_is_a_one_line_error(tmp_path):
    """A real kernel write error (EFBIG under RLIMIT_FSIZE), like a full disk."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    r = subprocess.run([SDRUN, "train", *RUN, "hydra.run.dir=run"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "could not write" in err and "checkpoint.pt" in err and "File too large" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list((tmp_path / "run").glob(".checkpoint.pt.*"))


def test_resume_with_step_evaluations_is_bit_identical(tmp_path):
    """eval_every_steps (SVHN's protocol): evals.jsonl and the best-val step survive a kill too."""
    run = [*RUN, "eval_every_steps=3"]
    train_in_process(tmp_path / "base", *run)  # the uninterrupted run, in this process
    killed = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", KILLER, "3", "before", *run, f"hydra.run.dir={killed}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = run_sdrun("train", *run, f"hydra.run.dir={killed}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert_same(outcome(killed), outcome(tmp_path / "base"))
    assert read_jsonl(killed / "evals.jsonl") == read_jsonl(tmp_path / "base" / "evals.jsonl")
    assert json.loads((killed / "results.json").read_text())["best_val_step"] is not None
