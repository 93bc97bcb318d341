"""End to end through the CLI (the shared console_runs fixture: a run through main(), a sweep
in a real `sdrun train -m` process), and the same trainer called directly."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sdrun.report.collect import REQUIRED_KEYS
from sdrun.rundir import RESULTS_KEYS, WALL_CLOCK_KEYS

from tests.conftest import CONSOLE_RUN, compose_cfg, read_jsonl, sdrun_main, train_in_process, write_cifar_pickles


def strip(rows):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in rows]


def test_help_lists_subcommands(tmp_path):
    r = sdrun_main("--help", cwd=tmp_path)
    assert r.returncode == 0 and "train" in r.stdout and "analyze" in r.stdout
    r = sdrun_main("train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "dataset: cifar10, cifar100, digits, imagenet, svhn" in r.stdout
    r = sdrun_main("fly", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("sdrun: error: unknown command 'fly'")


def test_dataset_recipe_and_overrides_compose():
    cfg = compose_cfg("dataset=cifar10")
    assert (cfg.depth, cfg.epochs, list(cfg.optim.milestones)) == (110, 500, [250, 375])
    cfg = compose_cfg("dataset=cifar10", "depth=1202", "pL=1.0")  # the command line wins over the recipe
    assert (cfg.depth, cfg.pL) == (1202, 1.0)


def test_cfg_job_prints_the_composed_config(tmp_path):
    r = sdrun_main("train", "dataset=cifar10", "depth=1202", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "depth: 1202" in r.stdout and "epochs: 500" in r.stdout and "- 375" in r.stdout


def test_tiny_run_writes_events_metrics_results(console_runs):
    run = console_runs / "run"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["step"] == 6
    assert 0 < metrics[0]["elapsed_s"] < metrics[1]["elapsed_s"] and metrics[0]["eta_s"] > 0 == metrics[1]["eta_s"]
    log = (run / "train.log").read_text()
    assert "| elapsed " in log and ", ETA 0s" in log
    results = json.loads((run / "results.json").read_text())
    assert set(results) == set(RESULTS_KEYS) and set(REQUIRED_KEYS) <= set(RESULTS_KEYS)  # sdrun.rundir names them all
    assert results["status"] == "finished" and results["num_blocks"] == 3
    assert results["expected_active_blocks"] == pytest.approx(1 - 1 / 6 + 1 - 2 / 6 + 0.5)
    best = min(metrics, key=lambda m: m["val_error_pct"])
    assert results["best_val_epoch"] == best["epoch"]
    assert results["test_error_at_best_val_pct"] == best["test_error_pct"]
    assert results["config"]["dataset"]["name"] == "digits" and "torch" in results["versions"]
    assert (run / "checkpoint.pt").is_file() and (run / "train.log").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()

    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/train", "error/train", "error/val", "error/test", "lr", "time/epoch_train_s",
                "throughput/train_images_per_s", "depth/active_blocks_mean", "depth/active_blocks_expected"):
        assert tag in tags, tag
        assert [e.step for e in acc.Scalars(tag)] == [1, 2]
    assert acc.Scalars("error/test")[1].value == pytest.approx(metrics[1]["test_error_pct"])


def test_same_seed_same_numbers(console_runs, tmp_path):
    """The CLI's run, repeated by calling the trainer directly: the same numbers; another seed: others.
    (Across processes: test_resume.py's runs, resumed in other processes, match a run in this one.)"""
    console = strip(read_jsonl(console_runs / "run" / "metrics.jsonl"))
    train_in_process(tmp_path / "a", *CONSOLE_RUN)
    assert strip(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == console
    train_in_process(tmp_path / "b", *CONSOLE_RUN, "seed=3")
    assert strip(read_jsonl(tmp_path / "b" / "metrics.jsonl")) != console


def test_multirun_sweeps_pL(console_runs):
    sweep = console_runs / "sweep"
    results = sorted((json.loads(p.read_text()) for p in sweep.glob("*/results.json")), key=lambda r: r["pL"])
    assert [r["pL"] for r in results] == [0.5, 1.0]
    assert results[1]["measured_active_blocks"] == 3.0 == results[1]["expected_active_blocks"]
    assert all(r["config"]["depth"] == 8 and r["status"] == "finished" for r in results)


def test_cifar10_pickles_end_to_end(tmp_path):
    root = write_cifar_pickles(tmp_path / "c10", per_batch=40, test=50)
    results = train_in_process(tmp_path / "run", "dataset=cifar10", f"dataset.root={root}",
                               "dataset.check_md5=false", "dataset.val_size=50", "depth=8", "epochs=1",
                               "optim.milestones=[]",
                               "batch_size=50")
    (m,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert m["step"] == 3  # 150 training images after the 50-image validation split
    assert results["dataset"] == "cifar10" and results["selection"] == "best_val"
