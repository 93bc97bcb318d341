"""`sdrun status` on a real sweep: one job finished, one failed, one SIGKILLed, one never started;
and on a single run that failed, then finished when run again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdrun.report import status
from sdrun.rundir import ERROR
from tests.conftest import SDRUN, TINY, read_jsonl, sdrun_main

# Job 0 trains; job 1's absurd lr makes the loss non-finite (a failed job); job 2 is killed
# while it trains; job 3 never starts (the sweep dies with job 2).
# A constant lr: digits' milestones lie past a 6-epoch run.
SWEEP = ["dataset=digits", "depth=8", "epochs=6", "max_steps_per_epoch=2", "batch_size=32", "eval_batch_size=512",
         "optim.milestones=[]", "optim.lr=0.1,1e30,0.05,0.02", "hydra.sweep.dir=sweep"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("status")
    proc = subprocess.Popen([SDRUN, "train", "-m", *SWEEP], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = root / "sweep" / "2" / "metrics.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if metrics.is_file() and len(read_jsonl(metrics)) >= 1:
            break
        time.sleep(0.05)
    while_running = status.survey([root])  # job 2 is in its second epoch now
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert len(read_jsonl(metrics)) < 6, "job 2 finished before it could be killed"
    return root, while_running


def by_job(data: dict) -> dict:
    (s,) = data["sweeps"]
    return {j["job"]: j for j in s["jobs"]}


def test_a_running_job_is_told_from_the_others_by_its_lock(sweep):
    _, data = sweep
    jobs = by_job(data)
    assert [jobs[n]["state"] for n in range(4)] == ["finished", "failed", "running", "not started"]
    assert jobs[2]["why"] == "lock held" and jobs[2]["epoch"] >= 1 and jobs[2]["eta_s"] > 0
    assert data["sweeps"][0]["total"]["expected_finish"] > data["time"]


def test_status_text_after_the_kill(sweep, capsys):
    root, _ = sweep
    assert status.main([str(root)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == (f"sweep {root / 'sweep'}: 4 jobs: 1 finished, 1 interrupted, 1 failed, 1 not started; "
                        "nothing running (run the sweep command again with this hydra.sweep.dir to finish it)")
    assert lines[1] == ("every job: dataset=digits depth=8 epochs=6 max_steps_per_epoch=2 batch_size=32 "
                        "eval_batch_size=512 optim.milestones=[]")
    rows = {line.split()[0]: line.split() for line in lines[4:8]}
    assert rows["0"][1:3] == ["finished", "6/6"]
    assert rows["1"][1] == "failed" and "optim.lr=1e+30" in out
    assert "error: non-finite training loss at epoch 1" in out
    assert rows["2"][1:2] == ["interrupted"] and "left)" in lines[6]
    assert rows["3"][1:4] == ["not", "started", "0/6"] and rows["3"][-1] == "optim.lr=0.02"
    finished = json.loads((root / "sweep" / "0" / "results.json").read_text())
    assert f"{finished['test_error_at_best_val_pct']:.2f}" in lines[4]


def test_status_json_without_torch(sweep):
    root, _ = sweep
    code = ("import sys, time; t = time.perf_counter(); from sdrun.cli import main\n"
            "try: main(['status', sys.argv[1], '--json'])\n"
            "except SystemExit as e: assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'sdrun status imported torch'\n"
            "print(time.perf_counter() - t, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    jobs = by_job(data)
    assert [jobs[n]["state"] for n in range(4)] == ["finished", "failed", "interrupted", "not started"]
    assert jobs[1]["error"].startswith("non-finite training loss") and jobs[2]["why"].startswith("lock free")
    assert jobs[2]["path"] == str(root / "sweep" / "2") and jobs[3]["path"] is None
    assert data["sweeps"][0]["total"] == {"jobs": 4, "finished": 1, "running": 0, "interrupted": 1, "failed": 1,
                                          "not_started": 1, "expected_finish": None}
    assert data["runs"] == []


def test_bad_input_is_one_line(tmp_path, capsys):
    assert status.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"sdrun status: error: {tmp_path / 'missing'} is not a directory"
    assert status.main([str(tmp_path), "--watch", "0"]) == 2


def test_a_single_run_that_failed_shows_failed_until_it_finishes(tmp_path, capsys):
    """A single run (no sweep summary) that dies on an error after its directory was kept
    records the error in it (error.json): `sdrun status` shows failed and the error line. A
    new attempt that stops on bad input before its first epoch leaves that record as it was;
    one that trains to the end clears it."""
    run = tmp_path / "run"
    args = [*TINY, "optim.milestones=[]", f"hydra.run.dir={run}"]
    r = sdrun_main("train", *args, "optim.lr=1e30", cwd=tmp_path)  # the loss overflows in epoch 1
    assert r.returncode == 2
    line = "non-finite training loss at epoch 1"
    (error_line,) = [e for e in r.stderr.splitlines() if e.startswith("sdrun train: error: ")]
    message = error_line.removeprefix("sdrun train: error: ")
    assert message.startswith(line)
    record = json.loads((run / ERROR).read_text())
    assert record["error"] == message and record["type"] == "NonFiniteLoss"

    assert status.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "runs: 1: 1 failed"
    (row,) = [x for x in out if x.startswith(str(run))]
    assert row.split()[1:3] == ["failed", "0/2"] and row.endswith(f"| error: {message}")
    (data,) = status.survey([tmp_path])["runs"]
    assert (data["state"], data["error"]) == ("failed", message)

    # Bad input found inside the job (the data split): the directory is put back, record included.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = sdrun_main("train", *args, "dataset.val_size=5000", cwd=tmp_path)
    assert r.returncode == 2 and "leaves no training images" in r.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert status.survey([tmp_path])["runs"][0]["state"] == "failed"

    r = sdrun_main("train", *args, cwd=tmp_path)  # run again with a sane lr: it trains to the end
    assert r.returncode == 0, r.stderr
    assert not (run / ERROR).exists()
    assert status.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "runs: 1: 1 finished" and "error" not in out
    (data,) = status.survey([tmp_path])["runs"]
    assert (data["state"], data["epoch"], data["error"]) == ("finished", 2, None)
