"""Run directories: is this one new, resumable or finished, and does it belong to this config?

sdrun.launch.app checks a run's directory with `check_run_dir` before it trains; sdrun.launch.guard's
Hydra callback runs the same check before Hydra writes into the directory, and sdrun.launch.preflight
for every job of a sweep. The files' names and readers are sdrun.rundir's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from sdrun.config import RUNTIME_ONLY, ConfigError, flatten, to_plain, validate
from sdrun.rundir import CHECKPOINT, FINISHED, RESULTS, CheckpointError, read_results

if TYPE_CHECKING:
    from sdrun.engine.state import SavedRun


class AlreadyFinished(Exception):
    """The run directory holds a finished run: nothing to do (requeue-friendly, exit 0)."""


def config_differences(saved: dict, current: dict) -> list[str]:
    a, b = flatten(saved), flatten(current)
    keys = sorted(k for k in a.keys() | b.keys() if k not in RUNTIME_ONLY and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in keys]


def load_saved_run(path: Path) -> SavedRun:
    """The run's checkpoint (a one-line CheckpointError if it cannot be used)."""
    # The engine, and torch with it, only where a checkpoint is read: a new run's directory is
    # checked, and a bad setting answered, before torch's import (seconds).
    from sdrun.engine.state import SavedRun

    return SavedRun.load(path)


def check_run_dir(run_dir: Path, cfg: DictConfig) -> SavedRun | None:
    """Return the checkpoint to resume from (None for a new run), or raise.

    Raises AlreadyFinished when results.json says the run is done, and CheckpointError
    when the directory's checkpoint belongs to another config.
    """
    run_dir = Path(run_dir)
    results = run_dir / RESULTS
    finished = read_results(run_dir)
    if finished.get("status") == FINISHED:
        # Only the same settings may exit 0 (a requeued job, a re-run script); other settings
        # would make a script believe a run it asked for is done.
        saved = finished.get("config")
        if not isinstance(saved, dict) and (run_dir / CHECKPOINT).is_file():
            saved = load_saved_run(run_dir / CHECKPOINT).config
        diffs = config_differences(saved, to_plain(cfg)) if isinstance(saved, dict) else []
        if diffs:
            raise CheckpointError(f"{run_dir} already holds a finished run made with other settings "
                                  f"({'; '.join(diffs)}); pick another hydra.run.dir for these settings")
        raise AlreadyFinished(f"{run_dir} already holds a finished run ({results}); nothing to do. "
                              f"Pick another hydra.run.dir to train again.")
    ckpt_path = run_dir / CHECKPOINT
    if not ckpt_path.is_file():
        return None
    saved = load_saved_run(ckpt_path)
    diffs = config_differences(saved.config, to_plain(cfg))
    if diffs:
        raise CheckpointError(f"{run_dir} belongs to another config ({'; '.join(diffs)}); "
                              f"use the run's own settings to resume it, or another hydra.run.dir")
    return saved


def check_config(cfg: DictConfig, device_here: bool = True) -> None:
    """A run's config checked before anything starts (a single run: RunDirGuard.on_run_start,
    before Hydra writes; a sweep: the pre-flight, every job before the first starts): its values
    (sdrun.config.validate) and, unless the job runs on another machine, its device."""
    validate(cfg)
    if device_here and str(cfg.device) not in ("auto", "cpu"):
        from sdrun.engine.runtime import device_problem  # torch: only for a device it must ask about

        problem = device_problem(cfg.device)
        if problem:
            raise ConfigError(problem)


def resume_dir(resume: str) -> Path:
    """`resume=PATH`: a run directory or its checkpoint.pt; the run continues in that directory."""
    path = Path(resume)
    run_dir = path.parent if path.name == CHECKPOINT or path.is_file() else path
    # A finished run without a checkpoint (checkpoint=false) is accepted: check_run_dir then
    # says it is done, or names the settings that differ.
    if not ((run_dir / CHECKPOINT).is_file() or (run_dir / RESULTS).is_file()):
        raise ConfigError(f"resume={resume}: no {CHECKPOINT} there")
    return run_dir
