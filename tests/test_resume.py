"""Runs that survive: real subprocesses, real SIGKILL/SIGTERM, resumed to identical numbers.

One run is interrupted every way in turn (each attempt a real process that resumes the
last), rather than one run per way: a process costs seconds of start-up, an epoch a
fraction of one."""

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

from sdrun.engine.state import load_checkpoint
from sdrun.files import OutputError, atomic_write
from sdrun.rundir import WALL_CLOCK_KEYS
from tests.conftest import SDRUN, read_jsonl, sdrun_main

# Six short epochs with step evaluations (SVHN's protocol), so evals.jsonl and the best-val
# step must survive the interruptions too; an epoch is a fraction of a second, a process's
# start-up several seconds, so the interruption chain below has epochs to spare.
RUN = ["dataset=digits", "depth=8", "epochs=6", "optim.milestones=[]", "max_steps_per_epoch=4", "batch_size=32",
       "eval_batch_size=512", "eval_every_steps=3"]

# Runs the real trainer in a child process whose N-th checkpoint write kills the process
# with SIGKILL after the temporary file is complete but before it replaces the old checkpoint.
# (A kill before a write leaves the same files behind as one at a random moment, below.)
KILLER = textwrap.dedent("""
    import os, signal, sys
    import sdrun.files as io
    n_target = int(sys.argv[1])
    real_atomic_write, count = io.atomic_write, [0]

    def atomic_write(path, write):
        if path.name == "checkpoint.pt":
            count[0] += 1
            if count[0] == n_target:
                def write_then_die(f):
                    write(f)
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_atomic_write(path, write_then_die)
        return real_atomic_write(path, write)

    io.atomic_write = atomic_write
    from sdrun.cli import main
    main(["train", *sys.argv[2:]])
""")


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in WALL_CLOCK_KEYS}


def records(run_dir: Path) -> dict[str, list[dict]]:
    """Every JSON record the run wrote, by file."""
    return {"metrics.jsonl": read_jsonl(run_dir / "metrics.jsonl"), "evals.jsonl": read_jsonl(run_dir / "evals.jsonl"),
            "results.json": [json.loads((run_dir / "results.json").read_text())]}


def outcome(run_dir: Path) -> tuple:
    stripped = {name: [strip(r) for r in rows] for name, rows in records(run_dir).items()}
    weights = load_checkpoint(run_dir / "checkpoint.pt")["model"]
    return stripped, weights


def differing_keys(a: Path, b: Path) -> set[str]:
    """The keys whose value differs anywhere between two runs' records, before any stripping."""
    ra, rb = records(a), records(b)
    assert {n: len(rows) for n, rows in ra.items()} == {n: len(rows) for n, rows in rb.items()}
    return {k for n in ra for x, y in zip(ra[n], rb[n]) for k in x.keys() | y.keys() if x.get(k) != y.get(k)}


def assert_same(a: tuple, b: tuple) -> None:
    for name in a[0]:
        assert a[0][name] == b[0][name], f"{name} differs"
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), f"weights differ: {k}"


def metrics_lines(run_dir: Path) -> int:
    return len(read_jsonl(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").exists() else 0


def checkpointed_epoch(run_dir: Path) -> int:
    checkpoint = run_dir / "checkpoint.pt"
    return load_checkpoint(checkpoint)["epoch"] if checkpoint.exists() else 0


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def kill_at_checkpoint_write(run_dir: Path, cwd: Path, epoch: int) -> None:
    """One attempt that resumes the run and is SIGKILLed during `epoch`'s checkpoint write."""
    n = epoch - checkpointed_epoch(run_dir)  # this attempt's n-th checkpoint write is that epoch's
    r = subprocess.run([sys.executable, "-c", KILLER, str(n), *RUN, f"hydra.run.dir={run_dir}"],
                       cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert checkpointed_epoch(run_dir) == epoch - 1  # the old checkpoint is intact
    # metrics.jsonl already has the killed epoch's line, which the resume must drop.
    assert metrics_lines(run_dir) == epoch


def resume_until_done(run_dir: Path, cwd: Path) -> None:
    """The last resume, through the CLI's main() in this process: the kills above are what
    needs real processes."""
    r = sdrun_main("train", *RUN, f"hydra.run.dir={run_dir}", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert (run_dir / "results.json").is_file()


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory) -> Path:
    """The uninterrupted run, through the CLI's main() (Hydra's .hydra/ and train.log included)."""
    cwd = tmp_path_factory.mktemp("baseline")
    r = sdrun_main("train", *RUN, "hydra.run.dir=run", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "run"


@pytest.fixture(scope="module")
def baseline(baseline_dir) -> tuple:
    return outcome(baseline_dir)


def test_interrupted_every_way_then_resumed_is_bit_identical(tmp_path, baseline, baseline_dir):
    """One run stopped up to four times, each attempt a real process resuming the last: SIGTERM
    (checkpoint, clear message, exit 128+15), SIGKILL during a checkpoint write (the temporary
    file complete, not yet in place), SIGKILL at one or two random moments. The last resume
    ends with the uninterrupted run's results, bit for bit (metrics, step evaluations, results,
    weights), and TensorBoard holds each epoch once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"

    # SIGTERM (preemption) once the first checkpoint is on disk.
    proc = subprocess.Popen([SDRUN, "train", *RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "checkpoint.pt").exists(), proc, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "resume" in err and "Traceback" not in err
    assert not (run_dir / "results.json").exists()
    stopped = checkpointed_epoch(run_dir)
    assert 1 <= stopped <= 2

    # SIGKILL at the next checkpoint write, once its temporary file is complete: the old
    # checkpoint must stay in place, and the killed epoch's metrics line must be dropped.
    kill_at_checkpoint_write(run_dir, tmp_path, stopped + 1)

    # SIGKILL at random moments (mid-step, mid-evaluation, mid-write) once training is under way.
    rng, kills = random.Random(1234), 0
    for _ in range(2):
        if (run_dir / "results.json").exists():
            break
        done = metrics_lines(run_dir)
        proc = subprocess.Popen([SDRUN, "train", *RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and metrics_lines(run_dir) <= done and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 1

    resume_until_done(run_dir, tmp_path)
    # The shared definition of the wall-clock keys (used by every test that compares runs,
    # tests/test_cuda.py's included) is exactly what differs here: a timing field missing
    # from it, or a listed field that no longer varies, fails this line.
    assert differing_keys(run_dir, baseline_dir) == WALL_CLOCK_KEYS
    assert_same(outcome(run_dir), baseline)
    assert json.loads((run_dir / "results.json").read_text())["best_val_step"] is not None
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("error/test")] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in acc.Scalars("error/test")] == pytest.approx(
        [m["test_error_pct"] for m in read_jsonl(run_dir / "metrics.jsonl")])


def test_finished_run_is_not_run_again(tmp_path, baseline_dir):
    shutil.copytree(baseline_dir, tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    r = sdrun_main("train", *RUN, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0 and "already holds a finished run" in r.stderr
    assert before == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(tmp_path):
    # A sane first epoch (warm-up lr), then an absurd lr that blows the loss up in epoch 2.
    r = sdrun_main("train", *RUN, "optim.warmup_epochs=1", "optim.warmup_lr=0.05", "optim.lr=1e30",
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
    """A real kernel write error (EFBIG under RLIMIT_FSIZE), like a full disk. In this process:
    only the soft limit is lowered, and put back, so the test process can write again."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, hard))
    try:
        r = sdrun_main("train", *RUN, "hydra.run.dir=run", cwd=tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "could not write" in err and "checkpoint.pt" in err and "File too large" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list((tmp_path / "run").glob(".checkpoint.pt.*"))
