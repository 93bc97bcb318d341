"""sdrun.launch.runs.check_run_dir: is a run directory new, finished, resumable, or another config's?"""

import json

import pytest

from sdrun.config import to_plain
from sdrun.engine.state import save_checkpoint
from sdrun.launch.runs import AlreadyFinished, check_run_dir
from sdrun.rundir import CheckpointError
from tests.conftest import compose_cfg

CFG = ["dataset=digits", "depth=8", "epochs=3", "optim.milestones=[]"]


def checkpoint(run_dir, cfg, epoch=1, **extra):
    """A checkpoint as the trainer writes one (the keys check_run_dir reads, plus a payload)."""
    save_checkpoint(run_dir / "checkpoint.pt", {"epoch": epoch, "step": 10 * epoch, "config": to_plain(cfg),
                                                "model": {}, **extra})


def test_new_directory_starts_a_new_run(tmp_path):
    cfg = compose_cfg(*CFG)
    assert check_run_dir(tmp_path / "missing", cfg) is None
    (tmp_path / "empty").mkdir()
    assert check_run_dir(tmp_path / "empty", cfg) is None
    (tmp_path / "empty" / "metrics.jsonl").write_text("")  # an attempt killed before its first checkpoint
    assert check_run_dir(tmp_path / "empty", cfg) is None


def test_finished_run_is_not_run_again(tmp_path):
    cfg = compose_cfg(*CFG)
    checkpoint(tmp_path, cfg, epoch=3)
    (tmp_path / "results.json").write_text(json.dumps({"status": "finished"}))
    with pytest.raises(AlreadyFinished, match="already holds a finished run"):
        check_run_dir(tmp_path, cfg)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"status": "running"}), json.dumps([1, 2])])
def test_results_that_do_not_say_finished_leave_the_run_resumable(tmp_path, content):
    cfg = compose_cfg(*CFG)
    checkpoint(tmp_path, cfg, epoch=2)
    (tmp_path / "results.json").write_text(content)
    assert check_run_dir(tmp_path, cfg).epoch == 2


def test_resumable_run_returns_its_checkpoint(tmp_path):
    cfg = compose_cfg(*CFG)
    checkpoint(tmp_path, cfg, epoch=2, best={"val_error_pct": 12.5})
    saved = check_run_dir(tmp_path, cfg)
    assert (saved.epoch, saved.full["step"], saved.full["best"]) == (2, 20, {"val_error_pct": 12.5})


def test_runtime_settings_may_differ_between_attempts(tmp_path):
    checkpoint(tmp_path, compose_cfg(*CFG))
    again = compose_cfg(*CFG, "device=cpu", "eval_batch_size=64", "num_workers=2", "progress=off",
                        f"resume={tmp_path}", "dataset.root=elsewhere")
    assert check_run_dir(tmp_path, again).epoch == 1


def test_another_configs_checkpoint_is_refused_naming_every_key(tmp_path):
    checkpoint(tmp_path, compose_cfg(*CFG))
    with pytest.raises(CheckpointError) as e:
        check_run_dir(tmp_path, compose_cfg(*CFG, "depth=14", "optim.lr=0.2", "seed=1"))
    message = str(e.value)
    assert "belongs to another config (depth: 8 there, 14 here; optim.lr: 0.1 there, 0.2 here)" in message
    assert "seed" not in message  # the same value is not a difference


def test_foreign_and_unreadable_checkpoints_are_refused(tmp_path):
    import torch

    cfg = compose_cfg(*CFG)
    (tmp_path / "a").mkdir()
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "a" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="is not an sdrun training checkpoint"):
        check_run_dir(tmp_path / "a", cfg)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"\0garbage")
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        check_run_dir(tmp_path / "b", cfg)
