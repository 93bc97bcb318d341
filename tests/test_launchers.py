"""Sweeps through Hydra's launcher plugins: joblib (hydra/launcher=parallel) and submitit's
local executor, for real, in parallel processes."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest
from hydra.types import RunMode

from sdrun.launchers import available_cores, gpu_slot
from tests.conftest import TINY, run_sdrun, sdrun_main

SWEEP = [*TINY, "epochs=1", "max_steps_per_epoch=2", "seed=1,2"]


def results_below(folder: Path) -> dict[int, dict]:
    """What a table of runs sees: every results.json below the folder, by seed."""
    found = [json.loads(p.read_text()) for p in folder.rglob("results.json")]
    return {r["seed"]: r for r in found}


@pytest.mark.parametrize("launcher", ["hydra/launcher=parallel", "hydra/launcher=submitit_local"])
def test_two_job_sweep_lands_where_runs_are_found(tmp_path, launcher):
    extra = ["hydra.launcher.n_jobs=2"] if launcher.endswith("parallel") else []
    r = run_sdrun("train", "-m", *SWEEP, launcher, *extra, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = tmp_path / "sweep"
    results = results_below(sweep)
    assert sorted(results) == [1, 2]
    assert all(res["status"] == "finished" for res in results.values())
    assert {p.parent.name for p in sweep.rglob("results.json")} == {"0", "1"}
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["num"] for j in summary["jobs"]] == [0, 1] and summary["failed"] == 0
    if launcher.endswith("parallel"):  # two jobs at once share the cores
        assert {res["cpu_threads"] for res in results.values()} == {max(1, available_cores() // 2)}


def test_failed_job_in_a_parallel_sweep_is_named_and_the_other_kept(tmp_path):
    r = run_sdrun("train", "-m", *TINY, "epochs=1", "max_steps_per_epoch=2", "depth=8,9",
                  "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("sdrun train: error: depth=9 is not 6n+2") and "1 of 2 jobs failed: job 1" in line
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert [(j["num"], j["status"]) for j in summary["jobs"]] == [(0, "finished"), (1, "failed")]
    assert (tmp_path / "sweep" / "0" / "results.json").is_file()


def _end_jobs(sweep: str, nums: list[int]) -> None:
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from sdrun.runs import RunDirGuard

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


def _claim(folder: Path) -> int:
    with gpu_slot(folder, 2, poll_s=0.05) as index:
        return index
