"""End to end through the real console script, in subprocesses."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import TINY, read_jsonl, run_sdrun, write_cifar_pickles

WALL_CLOCK = {"epoch_train_time_s", "images_per_s", "elapsed_s", "eta_s"}


def test_help_lists_subcommands(tmp_path):
    r = run_sdrun("--help", cwd=tmp_path)
    assert r.returncode == 0 and "train" in r.stdout
    r = run_sdrun("train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "dataset: cifar10, cifar100, digits, imagenet, svhn" in r.stdout


def test_cfg_job_shows_the_dataset_recipe(tmp_path):
    r = run_sdrun("train", "dataset=cifar10", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "depth: 110" in r.stdout and "epochs: 500" in r.stdout and "- 250" in r.stdout and "- 375" in r.stdout
    r = run_sdrun("train", "dataset=cifar10", "depth=1202", "pL=1.0", "--cfg", "job", cwd=tmp_path)
    assert "depth: 1202" in r.stdout and "pL: 1.0" in r.stdout


def test_tiny_run_writes_events_metrics_results(tmp_path):
    r = run_sdrun("train", *TINY, "checkpoint=true", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["step"] == 6
    assert 0 < metrics[0]["elapsed_s"] < metrics[1]["elapsed_s"] and metrics[0]["eta_s"] > 0 == metrics[1]["eta_s"]
    assert "| elapsed " in r.stdout and ", ETA 0s" in r.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and results["num_blocks"] == 3
    assert results["expected_active_blocks"] == pytest.approx(1 - 1 / 6 + 1 - 2 / 6 + 0.5)
    best = min(metrics, key=lambda m: m["val_error_pct"])
    assert results["best_val_epoch"] == best["epoch"]
    assert results["test_error_at_best_val_pct"] == best["test_error_pct"]
    assert results["config"]["dataset"]["name"] == "digits" and "torch" in results["versions"]
    assert (run / "checkpoint.pt").is_file() and (run / "train.log").is_file()

    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/train", "error/train", "error/val", "error/test", "lr", "time/epoch_train_s",
                "throughput/train_images_per_s", "depth/active_blocks_mean", "depth/active_blocks_expected"):
        assert tag in tags, tag
        assert [e.step for e in acc.Scalars(tag)] == [1, 2]
    assert acc.Scalars("error/test")[1].value == pytest.approx(metrics[1]["test_error_pct"])


def test_same_seed_same_numbers(tmp_path):
    for name in ("a", "b"):
        assert run_sdrun("train", *TINY, f"hydra.run.dir={name}", cwd=tmp_path).returncode == 0
    a, b = (read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("a", "b"))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    run_sdrun("train", *TINY, "seed=2", "hydra.run.dir=c", cwd=tmp_path)
    assert strip(read_jsonl(tmp_path / "c" / "metrics.jsonl")) != strip(a)


def test_multirun_sweeps_pL(tmp_path):
    r = run_sdrun("train", "-m", *TINY, "pL=0.5,1.0", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    results = sorted((json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/results.json")),
                     key=lambda r: r["pL"])
    assert [r["pL"] for r in results] == [0.5, 1.0]
    assert results[1]["measured_active_blocks"] == 3.0 == results[1]["expected_active_blocks"]


def test_cifar10_pickles_end_to_end(tmp_path):
    root = write_cifar_pickles(tmp_path / "c10", per_batch=40, test=50)
    r = run_sdrun("train", "dataset=cifar10", f"dataset.root={root}", "dataset.check_md5=false",
                  "dataset.val_size=50", "depth=8", "epochs=1", "batch_size=50", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (m,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert m["step"] == 3  # 150 training images after the 50-image validation split
