"""Pre-flight: a sweep is checked before its first job, check=true projects and writes nothing,
and a run that never started leaves its directory as it found it. One sweep is refused by a
real `sdrun train -m` process; the other cases go through the CLI's main() in this process."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from sdrun.config import DatasetConfig
from sdrun.data.readers import find_data
from sdrun.launch.guard import StartSnapshot, first_missing
from tests.conftest import TINY, run_sdrun, sdrun_main, write_cifar_pickles, write_image_folder, write_svhn_mats


def tree(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_sweep_with_one_bad_value_launches_nothing_and_names_it(tmp_path):
    # The smoke preset sweeps pL=1.0,0.5 and seed=1,2; the command line replaces its pL values.
    r = run_sdrun("train", "-m", "experiment=smoke", "pL=0.5,2.0", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "sdrun train: error: job 2 (pL=2.0 seed=1): pL=2.0 is outside [0, 1] (it is the last block's survival probability)",
        "sdrun train: error: job 3 (pL=2.0 seed=2): pL=2.0 is outside [0, 1] (it is the last block's survival probability)",
        "sdrun train: error: sweep not launched: 2 of 4 jobs would fail (listed above); nothing was started"], r.stderr
    assert list(tmp_path.iterdir()) == []  # no sweep directory, no job directory


def test_sweep_over_a_missing_dataset_launches_nothing(tmp_path):
    write_cifar_pickles(tmp_path / "c10")
    r = sdrun_main("train", "-m", "dataset=cifar10", "dataset.root=c10,nowhere", "depth=8,abc", "epochs=1", "optim.milestones=[]",
                   "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 2
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 4 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith("sdrun train: error: job 1 (dataset.root=c10 depth=abc): ") \
        and "could not be converted to Integer" in errors[0]
    for line, depth in zip(errors[1:3], ("8", "abc")):
        assert line.startswith(f"sdrun train: error: job {2 if depth == '8' else 3} (dataset.root=nowhere depth={depth}): ")
    assert "cifar10 not found under nowhere/cifar-10-batches-py" in errors[1]
    assert errors[3].endswith("3 of 4 jobs would fail (listed above); nothing was started")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c10"]


def test_check_projects_the_run_and_writes_nothing(tmp_path):
    r = sdrun_main("train", *TINY, "batch_size=8", "check=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for expected in ("digits (embedded): 1237 train / 200 val / 360 test images", "L = 3 blocks",
                     "p_1 = 0.8333 ... p_L = 0.5000; expected active blocks 2.00 of 3",
                     "2 epochs x 3 steps (batch 8) = 6 steps", "mean of 10 real steps after 3 warm-up",
                     "of training for the whole run (steps x step time; evaluation and checkpoints excluded)"):
        assert expected in out, out
    assert list(tmp_path.iterdir()) == []


def test_check_under_multirun_projects_the_sweep_and_writes_nothing(tmp_path):
    r = sdrun_main("train", "-m", *TINY, "batch_size=8", "seed=1,2", "check=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "pre-flight: 2 jobs composed and checked" in r.stdout
    assert "\njob 0 (seed=1)\n" in r.stdout and "\njob 1 (seed=2)\n" in r.stdout
    assert "[timed once for job 0: the same setting but the seed]" in r.stdout
    assert "sweep       2 jobs: " in r.stdout and "of training in all" in r.stdout
    assert list(tmp_path.iterdir()) == []  # no multirun/ either


def dataset(**values):
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), values)


def test_find_data_names_what_is_missing_without_reading(tmp_path):
    root = write_cifar_pickles(tmp_path / "c10")
    assert find_data(dataset(name="cifar10", root=str(root))) is None
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    problem = find_data(dataset(name="cifar10", root=str(root)))
    assert "data_batch_4" in problem and "data_batch_3" not in problem
    assert find_data(dataset(name="cifar10", root=str(root), download=True)) is None  # the job downloads
    folder = write_image_folder(tmp_path / "png")
    assert find_data(dataset(name="cifar10", root=str(folder))) is None  # format=auto finds the folders
    assert "image folders" in find_data(dataset(name="cifar10", root=str(root), format="imagefolder"))
    svhn = write_svhn_mats(tmp_path / "svhn")
    assert find_data(dataset(name="svhn", root=str(svhn))) is None
    (svhn / "extra_32x32.mat").unlink()
    assert "extra_32x32.mat" in find_data(dataset(name="svhn", root=str(svhn)))
    assert "imagenet: expected the folder" in find_data(dataset(name="imagenet", root=str(tmp_path)))
    assert find_data(dataset(name="digits")) is None


def test_a_failed_start_is_undone_in_place(tmp_path):
    """What Hydra and a failing job write (.hydra/ rewritten, train.log appended, new files) is
    put back byte for byte in an existing directory; a created one goes with its new parents."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("old config\n")
    (run / "train.log").write_text("old log\n")
    before = tree(tmp_path)
    snap = StartSnapshot.take(run, first_missing(run), ".hydra")
    (run / ".hydra" / "config.yaml").write_text("new config\n")
    (run / ".hydra" / "hydra.yaml").write_text("new\n")
    handler = logging.FileHandler(run / "train.log")  # as Hydra's job logging holds it open
    logging.getLogger().addHandler(handler)
    logging.getLogger().warning("a line of the failed attempt")
    (run / "events.out.tfevents.1").write_bytes(b"x")
    snap.undo()
    assert handler not in logging.getLogger().handlers
    assert tree(tmp_path) == before

    fresh = tmp_path / "a" / "b" / "run"
    snap = StartSnapshot.take(fresh, first_missing(fresh), ".hydra")
    (fresh / ".hydra").mkdir(parents=True)
    (fresh / "train.log").write_text("log\n")
    snap.undo()
    assert tree(tmp_path) == before  # a/ and a/b/ were made for it too

    snap = StartSnapshot.take(fresh, first_missing(fresh), ".hydra")
    fresh.mkdir(parents=True)
    (fresh / "metrics.jsonl").write_text('{"epoch": 1}\n')  # an epoch completed: the run started
    snap.undo()
    assert (fresh / "metrics.jsonl").is_file()
