"""DistributedDataParallel on the CPU: 2 real processes under torchrun with the gloo backend.

BatchNorm normalises each rank's half-batch with its own statistics (SyncBatchNorm has no
CPU kernel), so a 2-process run is close to, not equal to, one process over the same
global batch: the per-step losses agree within LOSS_RTOL. Everything else (gates, data,
gradient averaging, weight decay on dropped blocks) is checked exactly or to float
rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdrun.rundir import WALL_CLOCK_KEYS
from tests.conftest import read_jsonl, sdrun_main

HERE = Path(__file__).parent
# depth 14 = 6 blocks with linear decay to 0.5: most steps drop at least one block.
RUN = ["dataset=digits", "depth=14", "epochs=2", "optim.milestones=[]", "max_steps_per_epoch=4", "batch_size=32",
       "eval_batch_size=512", "pL=0.5"]
LOSS_RTOL = 0.02  # measured: at most 0.6 % per step over these 8 steps (per-rank BatchNorm statistics)


def env(**extra: str) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR", "DDP_TOY_OUT")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(HERE.parent), **extra)
    return e


def torchrun(*args: str, cwd: Path, nproc: int = 2, **extra_env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=300)


def probe(out: Path, run_dir: Path | None, cwd: Path, kill_after: int = 0, **extra_env: str):
    """The run under torchrun (2 processes), recorded by tests/ddp_probe.py; run_dir None: the default."""
    where = [] if run_dir is None else [f"hydra.run.dir={run_dir}"]
    return torchrun(str(HERE / "ddp_probe.py"), str(out), str(kill_after), *RUN, *where, cwd=cwd, **extra_env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One 2-process run under torchrun and the same run in this process (through the CLI's
    main()), both recorded by the probe; the torchrun launch runs tests/ddp_toy.py's check first."""
    from tests.ddp_probe import recording

    root = tmp_path_factory.mktemp("ddp")
    # No hydra.run.dir: each rank would resolve the default's ${now:...} itself; all must use rank 0's.
    (root / "ddp").mkdir()
    r = probe(root / "ddp" / "probe", None, root / "ddp", DDP_TOY_OUT=str(root / "toy"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_dir,) = (root / "ddp" / "runs").iterdir()
    (root / "ddp" / "run").symlink_to(run_dir)
    with recording(root / "single" / "probe"):
        r = sdrun_main("train", *RUN, f"hydra.run.dir={root / 'single' / 'run'}", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def test_gates_are_identical_on_every_rank_for_every_step(runs):
    r0, r1 = (torch.load(runs / "ddp" / "probe" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(runs / "single" / "probe" / "rank0.pt")
    assert len(r0["gates"]) == 8
    assert r0["gates"] == r1["gates"]
    assert r0["gates"] == single["gates"]  # the same seed draws the same gates with or without DDP
    assert any(not all(g) for g in r0["gates"]), "no block was ever dropped: the test would prove nothing"


def test_parameters_stay_identical_across_ranks(runs):
    r0, r1 = (torch.load(runs / "ddp" / "probe" / f"rank{r}.pt") for r in (0, 1))
    init = torch.load(runs / "single" / "probe" / "rank0.pt")["params"]
    assert r0["params"].keys() == r1["params"].keys() and r0["params"]
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    assert any(not torch.equal(r0["params"][k], init[k]) for k in init)  # it did train


def test_loss_curve_matches_one_process_over_the_global_batch(runs):
    r0, r1 = (torch.load(runs / "ddp" / "probe" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(runs / "single" / "probe" / "rank0.pt")
    assert r0["batch"] == r1["batch"] == [16] * 8 and single["batch"] == [32] * 8  # batch_size is global
    ddp = [(a * m + b * n) / (m + n) for a, b, m, n in zip(r0["loss"], r1["loss"], r0["batch"], r1["batch"])]
    assert ddp == pytest.approx(single["loss"], rel=LOSS_RTOL)
    # metrics.jsonl holds the loss summed over ranks, not rank 0's half
    ddp_metrics = read_jsonl(runs / "ddp" / "run" / "metrics.jsonl")
    single_metrics = read_jsonl(runs / "single" / "run" / "metrics.jsonl")
    assert [m["train_loss"] for m in ddp_metrics] == pytest.approx([m["train_loss"] for m in single_metrics],
                                                                   rel=LOSS_RTOL)
    assert [m["train_loss"] for m in ddp_metrics] == pytest.approx([sum(ddp[:4]) / 4, sum(ddp[4:]) / 4], rel=1e-5)


def test_training_errors_are_counted_over_both_ranks(runs):
    """metrics.jsonl's train_error_pct is the misclassified images of both ranks' halves of
    every global batch over the images of the epoch (rank 0's half alone gives another number)."""
    r0, r1 = (torch.load(runs / "ddp" / "probe" / f"rank{r}.pt") for r in (0, 1))
    both, rank0 = [], []
    for epoch in range(2):  # 4 steps an epoch
        steps = slice(4 * epoch, 4 * epoch + 4)
        both.append(100.0 * (sum(r0["wrong"][steps]) + sum(r1["wrong"][steps]))
                    / (sum(r0["batch"][steps]) + sum(r1["batch"][steps])))
        rank0.append(100.0 * sum(r0["wrong"][steps]) / sum(r0["batch"][steps]))
    metrics = read_jsonl(runs / "ddp" / "run" / "metrics.jsonl")
    assert [m["train_error_pct"] for m in metrics] == pytest.approx(both, abs=1e-9)
    assert rank0 != both, "rank 0's half alone has the same errors: the check would prove nothing"


def one_process_errors(state: dict, ctx=None) -> dict:
    """Val and test error (%) of a model state on the run's splits (or on one rank's part of
    them), evaluated here in one process."""
    from sdrun.data.batches import eval_batches, fit_normalizer
    from sdrun.data.readers import load_image_data
    from sdrun.ranks import shard
    from sdrun.model.resnet import model_for
    from tests.conftest import compose_cfg

    cfg = compose_cfg(*RUN)
    data = load_image_data(cfg.dataset, cfg.seed)
    normalizer = fit_normalizer(data.train.images, cfg.dataset)  # the run's std rule, as the trainer
    model = model_for(cfg)  # the run's shortcut and init choices
    model.load_state_dict(state)
    model = model.eval().to(memory_format=torch.channels_last)  # as the trainer evaluates on the CPU
    errors = {}
    for name, split in (("val", data.val), ("test", data.test)):
        if ctx is not None:
            split = split.part(shard(len(split), ctx))
        with torch.inference_mode():
            wrong = sum(int((model(x).argmax(1) != y).sum())
                        for x, y in eval_batches(split, normalizer, 512, True))
        errors[name] = 100.0 * wrong / len(split)
    return errors


def test_evaluation_errors_are_the_checkpointed_models_in_one_process(runs):
    """The sharded val/test errors, summed over ranks, are the final model's errors on the
    whole splits, as one process measures them (rank 0's part alone gives other numbers)."""
    from sdrun.ranks import Context
    from sdrun.engine.state import load_checkpoint

    state = load_checkpoint(runs / "ddp" / "run" / "checkpoint.pt")["model"]
    whole, rank0 = one_process_errors(state), one_process_errors(state, Context(0, 2))
    assert rank0 != whole, "rank 0's slices alone give the same errors: the check would prove nothing"
    final = read_jsonl(runs / "ddp" / "run" / "metrics.jsonl")[-1]
    assert (final["val_error_pct"], final["test_error_pct"]) == pytest.approx((whole["val"], whole["test"]), abs=1e-9)


def test_evaluation_errors_are_summed_over_the_ranks_slices(runs):
    """What each rank evaluated (its final weights and buffers, its slice), counted here in one
    process and summed: the run's val/test errors."""
    from sdrun.ranks import Context

    r0, r1 = (torch.load(runs / "ddp" / "probe" / f"rank{r}.pt") for r in (0, 1))
    parts = [one_process_errors(rank["state"], Context(i, 2)) for i, rank in enumerate((r0, r1))]
    final = read_jsonl(runs / "ddp" / "run" / "metrics.jsonl")[-1]
    both = {name: (parts[0][name] + parts[1][name]) / 2 for name in ("val", "test")}  # 200 and 360: even halves
    assert (final["val_error_pct"], final["test_error_pct"]) == pytest.approx((both["val"], both["test"]), abs=1e-9)
    assert parts[0] != both, "rank 0's slices alone give the same errors: the check would prove nothing"


def test_only_rank_zero_writes_one_run_directory(runs):
    run = runs / "ddp" / "run"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events")) == [
        ".hydra", ".sdrun.lock", "checkpoint.pt", "metrics.jsonl", "results.json", "train.log"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert len(read_jsonl(run / "metrics.jsonl")) == 2
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["status"] == "finished"
    log = (run / "train.log").read_text()
    assert log.count("epoch 1/2") == 1 and "distributed: 2 processes, global batch 32" in log


def test_all_ranks_resume_from_rank_zero_checkpoint(runs, tmp_path):
    """Kill the 2-process run after its first checkpoint; the same command resumes it to the
    numbers of the uninterrupted run."""
    run_dir = tmp_path / "run"
    killed = probe(tmp_path / "killed", run_dir, tmp_path, kill_after=1)
    assert killed.returncode != 0 and (run_dir / "checkpoint.pt").is_file()
    assert not (run_dir / "results.json").exists()
    resumed = probe(tmp_path / "resumed", run_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in (run_dir / "train.log").read_text()

    def strip(r):
        return {k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS}

    baseline = runs / "ddp" / "run"
    assert [strip(m) for m in read_jsonl(run_dir / "metrics.jsonl")] == \
           [strip(m) for m in read_jsonl(baseline / "metrics.jsonl")]
    a, b = (torch.load(d / "resumed" / "rank1.pt")["params"] if d == tmp_path else
            torch.load(d / "probe" / "rank1.pt")["params"] for d in (tmp_path, runs / "ddp"))
    for name in a:  # rank 1 too ends with the uninterrupted run's weights
        assert torch.equal(a[name], b[name]), name


def test_ddp_update_equals_single_process_with_dropped_blocks(runs):
    """No BatchNorm, an uneven split (8 + 7), blocks dropped: DDP's update is the single-process
    one to float rounding, and dropped blocks get weight decay and momentum there too
    (tests/ddp_toy.py, run in the fixture's torchrun launch)."""
    reports = [json.loads((runs / "toy" / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert all(rep["world_size"] == 2 for rep in reports)
    assert reports[0]["fingerprint"] == reports[1]["fingerprint"]
    for rep in reports:
        assert rep["max_abs_diff_to_single_process"] < 1e-6
        assert rep["dropped_block_moved"] > 1e-3


def test_multirun_under_torchrun_is_refused(tmp_path):
    r = torchrun("--no-python", str(Path(sys.executable).with_name("sdrun")), "train", "-m", *RUN,
                 "seed=1,2", cwd=tmp_path, nproc=1)  # one process is under torchrun too
    assert r.returncode != 0
    assert "sdrun train: error: sdrun train -m under torchrun" in r.stderr
    # torchrun prints its own ChildFailedError report; no frame of sdrun's may show
    assert "sdrun/guard.py" not in r.stderr and "sdrun/cli.py" not in r.stderr
