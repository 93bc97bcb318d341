"""Sweeps through Hydra's launcher plugins: joblib (hydra/launcher=parallel) and submitit's
local executor, for real, in parallel processes."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

from hydra.types import RunMode

from sdrun.launch.launchers import available_cores, claim_slot, default_local_jobs, gpu_slot, threads_per_job
from tests.conftest import TINY, run_sdrun, sdrun_main, write_cifar_pickles


def results_below(folder: Path) -> dict[int, dict]:
    """What a table of runs sees: every results.json below the folder, by seed."""
    found = [json.loads(p.read_text()) for p in folder.rglob("results.json")]
    return {r["seed"]: r for r in found}


def test_submitit_sweep_lands_where_runs_are_found(tmp_path):
    """submitit's local executor (the SLURM launcher's code path without SLURM): one job, in
    its own process, lands where tables find it (several jobs at once: the parallel test)."""
    r = run_sdrun("train", "-m", *TINY, "epochs=1", "max_steps_per_epoch=2", "seed=1",
                  "hydra/launcher=submitit_local", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = tmp_path / "sweep"
    results = results_below(sweep)
    assert sorted(results) == [1] and results[1]["status"] == "finished"
    assert [p.parent.name for p in sweep.rglob("results.json")] == ["0"]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["num"] for j in summary["jobs"]] == [0] and summary["failed"] == 0


def test_parallel_sweep_lands_where_runs_are_found_and_names_its_failed_jobs(tmp_path):
    """Four jobs on two joblib workers: two on good CIFAR-10 files land where tables find them,
    two on a truncated copy (a failure the pre-flight cannot foresee: every file is there)
    fail, are named on the last line and in sweep_summary.json, and leave the others' results."""
    write_cifar_pickles(tmp_path / "good")
    write_cifar_pickles(tmp_path / "bad")
    (tmp_path / "bad" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated")
    # jobs_per_gpu is sdrun's key: it must reach the jobs and never joblib.Parallel.
    r = run_sdrun("train", "-m", "dataset=cifar10", "dataset.check_md5=false", "dataset.val_size=20", "depth=8",
                  "epochs=1", "optim.milestones=[]", "max_steps_per_epoch=2", "batch_size=32", "checkpoint=false",
                  "dataset.root=good,bad",
                  "seed=1,2", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "hydra.launcher.jobs_per_gpu=3",
                  "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("sdrun train: error: cannot read cifar10") and "2 of 4 jobs failed: job 2" in line, line
    sweep = tmp_path / "sweep"
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [(j["num"], j["status"]) for j in summary["jobs"]] == [
        (0, "finished"), (1, "finished"), (2, "failed"), (3, "failed")]
    results = results_below(sweep)
    assert sorted(results) == [1, 2] and all(res["status"] == "finished" for res in results.values())
    assert {p.parent.name for p in sweep.rglob("results.json")} == {"0", "1"}
    # Two jobs at once, each on its share of the cores. An outcome check: on the CPU joblib's
    # loky workers limit their threads to the same share, so it does not single out sdrun's
    # job_resources (test_threads_and_n_jobs_follow_k_times_gpus checks that rule directly).
    assert {res["cpu_threads"] for res in results.values()} == {max(1, available_cores() // 2)}


def _end_jobs(sweep: str, nums: list[int]) -> None:
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from sdrun.launch.guard import RunDirGuard

    for num in nums:
        config = OmegaConf.create({"hydra": {"mode": "MULTIRUN", "sweep": {"dir": sweep}, "job": {"num": num},
                                             "runtime": {"output_dir": f"{sweep}/{num}"}}})
        config.hydra.mode = RunMode.MULTIRUN
        RunDirGuard().on_job_end(config, JobReturn(overrides=[f"seed={num}"], status=JobStatus.COMPLETED))


def test_sweep_summary_keeps_every_job_when_they_end_at_once(tmp_path):
    """Jobs of a parallel sweep end in several processes at once: no lost update."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_end_jobs, args=(str(tmp_path), list(range(i, 40, 8)))) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [j["num"] for j in summary["jobs"]] == list(range(40))
    assert summary["failed"] == 0


def test_slurm_preset_composes_with_gpus_time_limit_and_requeue(tmp_path):
    r = sdrun_main("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                   "-p", "hydra.launcher", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for line in ("SlurmLauncher", "gpus_per_node: 1", "timeout_min: 1440", "max_num_timeout: 20",
                 "signal_delay_s: 120", "partition: gpu"):
        assert line in r.stdout


def test_gpu_slots_never_hand_one_gpu_to_two_jobs(tmp_path):
    with gpu_slot(tmp_path, 2) as a, gpu_slot(tmp_path, 2) as b:
        assert {a, b} == {0, 1}
        got = []
        waiter = threading.Thread(target=lambda: got.append(_claim(tmp_path)))
        waiter.start()
        time.sleep(0.5)
        assert not got  # both GPUs taken: the third job waits
    waiter.join(timeout=10)
    assert got and got[0] in (0, 1)


def _claim(folder: Path, gpus: int = 2, per_gpu: int = 1) -> int:
    with gpu_slot(folder, gpus, poll_s=0.05, per_gpu=per_gpu) as index:
        return index


# ---------------------------------------------------------------- jobs_per_gpu: K slots per GPU
# Fake GPUs: the slot logic only sees a GPU count; the locks and the threads/processes are real.

def test_k_slots_per_gpu_fill_evenly_then_a_job_waits_for_the_first_free_one(tmp_path):
    import contextlib

    with contextlib.ExitStack() as held:
        first = [held.enter_context(gpu_slot(tmp_path, 3, per_gpu=2)) for _ in range(3)]
        assert sorted(first) == [0, 1, 2]  # least-loaded first: one job on each GPU before a second
        second = [held.enter_context(gpu_slot(tmp_path, 3, per_gpu=2)) for _ in range(3)]
        assert sorted(first + second) == [0, 0, 1, 1, 2, 2]  # K = 2 each, none more
        assert claim_slot(tmp_path / ".gpu_slots", 3, 2) is None  # all 6 taken
        got = []
        waiter = threading.Thread(target=lambda: got.append(_claim(tmp_path, gpus=3, per_gpu=2)))
        waiter.start()
        time.sleep(0.5)
        assert not got  # every slot taken: the seventh job waits
    waiter.join(timeout=10)  # all released: it gets one at once
    assert got and got[0] in (0, 1, 2)


def test_a_new_job_goes_to_the_gpu_with_the_fewest_jobs(tmp_path):
    folder = tmp_path / ".gpu_slots"
    held = [claim_slot(folder, 3, 3) for _ in range(6)]
    assert [g for g, _ in held] == [0, 1, 2, 0, 1, 2]  # 2 jobs on each GPU
    for i in (2, 5, 3):  # GPU 2's jobs end and one of GPU 0's: loads 1, 2, 0
        held[i][1].close()  # closing the file drops its lock, as a finished job's process does
    # The fewest jobs first, ties to the lowest index, until each GPU has its 3.
    more = [claim_slot(folder, 3, 3) for _ in range(6)]  # kept: a dropped file object unlocks
    assert [g for g, _ in more] == [2, 0, 2, 0, 1, 2]
    assert claim_slot(folder, 3, 3) is None


def _hold_slot(folder: str, gpus: int, per_gpu: int, hold_s: float, log: str) -> None:
    with gpu_slot(Path(folder), gpus, poll_s=0.02, per_gpu=per_gpu) as gpu:
        start = time.monotonic()
        time.sleep(hold_s)
        with open(log, "a") as f:
            f.write(f"{gpu} {start} {time.monotonic()}\n")


def test_processes_never_put_more_than_k_jobs_on_a_gpu_and_use_every_slot(tmp_path):
    """12 real processes, 2 fake GPUs x 2 slots: at no instant more than 2 jobs on a GPU, and
    each GPU runs 2 at once at some point (no slot left idle while jobs wait)."""
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "log.txt"
    procs = [ctx.Process(target=_hold_slot, args=(str(tmp_path), 2, 2, 0.3, str(log))) for _ in range(12)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    spans = [line.split() for line in log.read_text().splitlines()]
    assert len(spans) == 12
    for gpu in ("0", "1"):
        mine = [(float(a), float(b)) for g, a, b in spans if g == gpu]
        # jobs running on this GPU at each job's start
        at_start = [sum(a <= s < b for a, b in mine) for s, _ in mine]
        assert max(at_start) == 2, (gpu, at_start)


def test_threads_and_n_jobs_follow_k_times_gpus():
    from omegaconf import OmegaConf

    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert default_local_jobs(4, gpus=2) == 8 and default_local_jobs(1, gpus=3) == 3
    assert default_local_jobs(4, gpus=0) == max(1, available_cores() // 4)
    launcher = OmegaConf.create({"_target_": joblib, "n_jobs": 8, "jobs_per_gpu": 4})
    assert threads_per_job(launcher, num_gpus=2) == max(1, available_cores() // 8)
    # More jobs than slots: only K x GPUs run at once, so they share the cores.
    wide = OmegaConf.create({"_target_": joblib, "n_jobs": 16, "jobs_per_gpu": 2})
    assert threads_per_job(wide, num_gpus=1) == max(1, available_cores() // 2)


def test_bad_jobs_per_gpu_is_one_line(tmp_path):
    r = sdrun_main("train", "-m", *TINY, "hydra/launcher=parallel", "hydra.launcher.jobs_per_gpu=0",
                   "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "sdrun train: error: hydra.launcher.jobs_per_gpu=0 must be at least 1"
    assert not (tmp_path / "sweep").exists()
