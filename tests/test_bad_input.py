"""Bad invocations: each exits 2 with one line naming the problem, and touches no run.

Every case runs `sdrun train` through the console script's own main() in this process (the
same code path, without a process's start-up); one case of each error family also runs the
installed console script in its own process, as a user does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_sdrun, sdrun_main, write_cifar_pickles

BASE = ["dataset=digits", "depth=8", "epochs=3", "optim.milestones=[2]", "max_steps_per_epoch=2", "batch_size=32"]


class Evil:
    """Unpickling this runs a shell command: what a hostile checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """An unfinished run (checkpoint, no results), a depth-14 run, and files to break things with.

    The two runs are real `sdrun train` runs (Hydra's .hydra/ and train.log included), so the
    cases below can check that none of those files changes."""
    w = tmp_path_factory.mktemp("world")
    r = sdrun_main("train", *BASE, "hydra.run.dir=own", cwd=w)
    assert r.returncode == 0, r.stderr
    shutil.copytree(w / "own", w / "done")  # a finished run (results.json and checkpoint)
    (w / "own" / "results.json").unlink()  # now it is a resumable, unfinished run
    r = sdrun_main("train", *BASE, "depth=14", "hydra.run.dir=deeper", cwd=w)
    assert r.returncode == 0, r.stderr
    (w / "deeper" / "results.json").unlink()
    assert (w / "own" / ".hydra" / "config.yaml").is_file() and (w / "own" / "train.log").is_file()
    (w / "evil").mkdir()
    torch.save({"epoch": 1, "config": {}, "payload": Evil(w / "pwned")}, w / "evil" / "checkpoint.pt")
    (w / "foreign").mkdir()
    torch.save({"conv.weight": torch.zeros(3)}, w / "foreign" / "checkpoint.pt")
    (w / "garbage").mkdir()
    (w / "garbage" / "checkpoint.pt").write_bytes(b"\x00not a checkpoint" * 10)
    write_cifar_pickles(w / "c10")
    write_cifar_pickles(w / "c10bad")
    (w / "c10bad" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated")
    # A resumable CIFAR run whose data then goes missing, and a reused directory without a run.
    r = sdrun_main("train", *BASE, *C10RUN, f"dataset.root={w}/c10", "hydra.run.dir=c10run", cwd=w)
    assert r.returncode == 0, r.stderr
    (w / "c10run" / "results.json").unlink()
    (w / "reused" / ".hydra").mkdir(parents=True)
    (w / "reused" / ".hydra" / "config.yaml").write_text("an earlier attempt's config\n")
    (w / "reused" / "train.log").write_text("an earlier attempt's log\n")
    (w / "reused" / "notes.txt").write_text("the user's own file\n")
    return w


C10RUN = ["dataset=cifar10", "dataset.check_md5=false", "dataset.val_size=20"]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the message is about a machine without CUDA")

# (arguments, part of the one-line message); the error families: range checks (validate),
# Hydra composition (types, enums, unknown keys and groups), missing or broken data, bad
# checkpoints and run directories.
CASES = [
    (["pL=1.5"], "pL=1.5 is outside [0, 1]"),
    (["pL=-0.1"], "pL=-0.1 is outside [0, 1]"),
    (["pL=abc"], "could not be converted to Float"),
    (["depth=100"], "depth=100 is not 6n+2"),
    (["depth=2"], "depth=2 is not 6n+2"),
    (["depth=deep"], "could not be converted to Integer"),
    (["dataset=imagenet21k"], "Could not find 'dataset/imagenet21k'"),
    (["dataset=imagenet", "depth=110"], "depth=110 is not an ImageNet ResNet depth"),
    (["survival=cubic"], "Invalid value 'cubic'"),
    (["model.scaling=sideways"], "Invalid value 'sideways'"),
    (["dataset.loader=disk"], "Invalid value 'disk'"),
    (["epochs=-3"], "epochs=-3 must be at least 1"),
    # `+` opens Hydra's struct flag: a typo would be composed and silently ignored (issue 23)
    (["+pl=0.9"], "pl is not a setting sdrun knows (did you mean pL?)"),
    (["+optim.lrr=0.9"], "optim.lrr is not a setting sdrun knows (did you mean optim.lr?)"),
    (["batch_size=0"], "batch_size=0 must be at least 1"),
    (["log.grad_histograms_every=-1"], "log.grad_histograms_every=-1 must be >= 0"),
    (["no_such_key=1"], "Could not override 'no_such_key'"),
    (["dataset.colour=red"], "Could not override 'dataset.colour'"),
    # Ranges of every numeric setting, NaN and infinity included (issue 23): before anything is made
    (["optim.lr=-0.1"], "optim.lr=-0.1 must be a finite number > 0"),
    (["optim.lr=nan"], "optim.lr=nan must be a finite number > 0"),
    (["optim.lr=inf"], "optim.lr=inf must be a finite number > 0"),
    (["optim.milestones=[375,250]"], "optim.milestones=[375, 250] must be increasing"),
    (["optim.milestones=[2,4]"], "optim.milestones=[2, 4] reach past the run's end (epochs=3): the lr would never drop at 4"),
    # a shortened run keeping a longer recipe's milestone would never drop its lr
    (["epochs=1"], "optim.milestones=[2] reach past the run's end (epochs=1)"),
    (["optim.momentum=1.5"], "optim.momentum=1.5 must be in [0, 1)"),
    (["optim.momentum=nan"], "optim.momentum=nan must be in [0, 1)"),
    (["optim.weight_decay=-1e-4"], "optim.weight_decay=-0.0001 must be a finite number >= 0"),
    (["optim.weight_decay=nan"], "optim.weight_decay=nan must be a finite number >= 0"),
    (["optim.gamma=0"], "optim.gamma=0.0 must be a finite number in (0, 1]"),
    (["optim.gamma=10"], "optim.gamma=10.0 must be a finite number in (0, 1]"),
    (["optim.warmup_lr=-inf"], "optim.warmup_lr=-inf must be a finite number > 0"),
    (["optim.warmup_epochs=3"], "optim.warmup_epochs=3 must be in [0, epochs=3)"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs=-1 must be in [0, epochs=3)"),
    (["pL=nan"], "pL=nan is outside [0, 1]"),
    (["seed=-1"], "seed=-1 must be an integer in [0, 2^63)"),
    (["dataset.split_seed=-5"], "dataset.split_seed=-5 must be an integer in [0, 2^63)"),
    (["eval_every_steps=0"], "eval_every_steps=0 must be at least 1"),
    (["eval_batch_size=0"], "eval_batch_size=0 must be at least 1"),
    (["max_steps_per_epoch=0"], "max_steps_per_epoch=0 must be at least 1"),
    (["num_workers=-2"], "num_workers=-2 must be >= 0"),
    (["dataset.val_size=-1"], "dataset.val_size=-1 must be >= 0"),
    (["dataset.translate=-4"], "dataset.translate=-4 must be >= 0"),
    (["dataset.image_size=0"], "dataset.image_size=0 must be at least 1"),
    (["dataset.image_size=300"], "dataset.resize_size=256 must be >= dataset.image_size=300"),
    (["dataset.num_classes=1"], "dataset.num_classes=1 must be at least 2"),
    (["dataset.val_per_class=[400]"], "dataset.val_per_class=[400] must be two counts >= 0"),
    (["dataset.color_jitter=nan"], "dataset.color_jitter=nan must be a finite number >= 0"),
    (["dataset.lighting=-0.1"], "dataset.lighting=-0.1 must be a finite number >= 0"),
    (["device=tpu"], "device='tpu' must be auto, cpu, cuda or cuda:N"),
    (["precision=fp16"], "Invalid value 'fp16'"),
    (["device=cpu", "precision=tf32", "hydra.run.dir={w}/new"], "precision=tf32 is a CUDA tensor-core mode"),
    pytest.param(["device=cuda"], "CUDA is not available", marks=NO_CUDA, id="device=cuda"),
    (["dataset=cifar10", "dataset.root={w}/nowhere", "hydra.run.dir={w}/new"], "cifar-10-batches-py"),
    (["dataset=cifar10", "dataset.root={w}/c10", "hydra.run.dir={w}/new"], "not found or corrupt"),  # md5 on
    (["dataset=cifar10", "dataset.root={w}/c10bad", "dataset.check_md5=false", "hydra.run.dir={w}/new"],
     "data_batch_3"),
    (["dataset=svhn", "dataset.root={w}/nowhere", "hydra.run.dir={w}/new"],
     "train_32x32.mat, extra_32x32.mat, test_32x32.mat"),
    (["dataset.val_size=5000", "hydra.run.dir={w}/new"], "dataset.val_size=5000 leaves no training images"),
    (["dataset=cifar10", "dataset.root={w}/nowhere", "hydra.run.dir={w}/new/deeper"], "cifar-10-batches-py"),
    # data missing in a directory that holds files (left byte-identical) and for a resume
    (["dataset=cifar10", "dataset.root={w}/nowhere", "hydra.run.dir={w}/reused"], "cifar-10-batches-py"),
    ([*C10RUN, "dataset.root={w}/nowhere", "hydra.run.dir={w}/c10run"], "cifar-10-batches-py"),
    (["resume={w}/nowhere"], "no checkpoint.pt there"),
    (["resume={w}/deeper/checkpoint.pt"], "belongs to another config (depth: 14 there, 8 here)"),
    (["depth=20", "hydra.run.dir={w}/own"], "belongs to another config (depth: 8 there, 20 here)"),
    # A finished run re-run with other settings: refused with the differing keys, not "done".
    (["dataset=cifar10", "dataset.root={w}/c10", "hydra.run.dir={w}/done"], "dataset.name: 'digits' there, 'cifar10' here"),
    (["depth=14", "resume={w}/done"], "{w}/done already holds a finished run made with other settings (depth: 8 there, 14 here)"),
    (["eval_every_steps=2", "hydra.run.dir={w}/done"], "(eval_every_steps: None there, 2 here)"),
    (["-m", "pL=0.5,1.0", "--cfg", "hydra"], "-m/--multirun and --cfg cannot be combined"),
    (["resume={w}/evil"], "refusing to load it"),
    (["resume={w}/foreign"], "is not an sdrun training checkpoint"),
    (["resume={w}/garbage"], "is not a readable checkpoint"),
]

# One per family, through the installed console script in a process of its own.
CONSOLE = [
    (["pL=1.5"], "pL=1.5 is outside [0, 1]"),  # range check
    (["no_such_key=1"], "Could not override 'no_such_key'"),  # Hydra composition
    (["dataset=cifar10", "dataset.root={w}/nowhere", "hydra.run.dir={w}/new"], "cifar-10-batches-py"),  # data
    (["depth=20", "hydra.run.dir={w}/own"], "belongs to another config (depth: 8 there, 20 here)"),  # run dir
    (["resume={w}/evil"], "refusing to load it"),  # hostile checkpoint
]


def ids(cases):
    return [getattr(c, "id", None) or " ".join(c[0]) for c in cases]


def snapshot(w: Path) -> dict:
    return {p.relative_to(w): p.read_bytes() for p in sorted(w.rglob("*")) if p.is_file()}


def check_refused(w: Path, args: list[str], expected: str, run) -> None:
    args = [a.format(w=w) for a in args]
    run_dir = [] if any(a.startswith(("resume=", "hydra.run.dir=")) for a in args) else [f"hydra.run.dir={w / 'own'}"]
    before = snapshot(w)
    r = run("train", *BASE, *args, *run_dir, cwd=w)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, r.stderr
    assert err.startswith("sdrun train: error: ") and expected.format(w=w) in err, err
    assert not (w / "pwned").exists()  # the hostile checkpoint never ran its payload
    # Nothing changed: errors caught before the job starts touch nothing; a job that stops on
    # bad input before its first epoch removes the directory it created (new/, new/deeper/) or
    # puts back what Hydra wrote into an existing one (.hydra/, train.log).
    assert snapshot(w) == before
    assert not (w / "new").exists() and not (w / "runs").exists()


@pytest.mark.parametrize("args,expected", CASES, ids=ids(CASES))
def test_bad_invocation(world, args, expected):
    check_refused(world, args, expected, sdrun_main)


@pytest.mark.parametrize("args,expected", CONSOLE, ids=ids(CONSOLE))
def test_bad_invocation_through_the_console_script(world, args, expected):
    check_refused(world, args, expected, run_sdrun)


def test_a_sweep_with_an_out_of_range_job_starts_none(world):
    """The range rules run in the sweep's pre-flight too: one line per bad job, then the verdict."""
    before = snapshot(world)
    # -m after the first override, as users type it (argparse alone would print its usage)
    r = sdrun_main("train", *BASE, "-m", "optim.lr=0.1,nan", "hydra.sweep.dir=sweep", cwd=world)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines() == [
        "sdrun train: error: job 1 (optim.lr=nan): optim.lr=nan must be a finite number > 0",
        "sdrun train: error: sweep not launched: 1 of 2 jobs would fail (listed above); nothing was started"]
    assert snapshot(world) == before and not (world / "sweep").exists()


@pytest.mark.parametrize("where", ["hydra.run.dir={w}/done", "resume={w}/done"])
def test_finished_run_with_the_same_settings_is_done_and_untouched(world, where):
    before = snapshot(world)
    r = sdrun_main("train", *BASE, where.format(w=world), cwd=world)
    assert r.returncode == 0, r.stderr
    assert "already holds a finished run" in r.stderr and "nothing to do" in r.stderr
    assert snapshot(world) == before


def test_unreadable_image_files_are_counted_and_the_first_named(tmp_path):
    """Undecodable files in an image folder: the run's reader counts them and names the first;
    a sweep is refused by the pre-flight's sample (3 files per class folder) before any job."""
    from tests.conftest import write_image_folder  # (the imports above are another case list's)

    root = write_image_folder(tmp_path / "imgs", classes=[f"k{i}" for i in range(10)], per_class=(4, 2), ext="jpg")
    for path in [*(root / "train" / "k3").iterdir(), root / "test" / "k7" / "0001.jpg"]:
        path.write_bytes(b"not a jpeg")  # 5 of the 60 files; all of train/k3, so any sample holds 3
    args = ["dataset=cifar10", "dataset.format=imagefolder", "dataset.root=imgs", "depth=8", "epochs=1",
            "optim.milestones=[]"]
    before = snapshot(tmp_path)
    r = sdrun_main("train", *args, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "sdrun train: error: dataset.root=imgs: 5 of 60 image files cannot be read as images, the first: "
        "imgs/train/k3/0000.jpg (cannot identify image file)"]
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]

    r = sdrun_main("train", "-m", *args, "seed=1,2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3, r.stderr
    for num, line in enumerate(lines[:2]):
        assert line.startswith(f"sdrun train: error: job {num} (seed={num + 1}): dataset.root=imgs: 4 of the 50 image "
                               f"files sampled (3 per class folder) cannot be read as images, the first: "
                               f"imgs/train/k3/"), line
    assert lines[2].endswith("2 of 2 jobs would fail (listed above); nothing was started")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]
