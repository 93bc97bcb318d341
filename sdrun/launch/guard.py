"""The Hydra callback that guards run directories and sweeps (conf/train.yaml registers it).

- `RunDirGuard.on_run_start` checks a single run's directory *before* Hydra writes its
  .hydra/ snapshot into it (sdrun.launch.runs.check_run_dir), so a bad invocation never touches an
  existing run, and remembers what was there so that a run that fails before its first epoch
  leaves no trace (`undo_failed_start`); with check=true it reports and stops (sdrun.launch.preflight).
- `RunDirGuard.on_multirun_start` checks every job of a sweep before the first starts.
- `RunDirGuard.on_job_end` keeps `sweep_summary.json` in a multirun's sweep directory,
  so a failed job is recorded with its overrides and error while the others finish.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from sdrun.config import ConfigError, validate
from sdrun.errors import one_line
from sdrun.files import write_json
from sdrun.liveness import refuse_if_busy
from sdrun.launch.runs import check_run_dir, resume_dir
from sdrun.ranks import env_rank
from sdrun.rundir import SWEEP_SUMMARY


class GuardStop(BaseException):
    """Carries an error out of a Hydra callback (Hydra turns a callback's Exception into a warning)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class RunDirGuard(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global RUN_START
        RUN_START = None
        try:
            validate(config)
            from sdrun.engine.distributed import current, share_run_dir
            from sdrun.ranks import launched_by_torchrun
            if config.check and launched_by_torchrun():
                raise ConfigError("check=true runs in one process; run it without torchrun")
            # Before torchrun's other ranks can create rank 0's directory (share_run_dir lets them go on).
            created = first_missing(Path(config.hydra.run.dir))
            share_run_dir(config)  # under torchrun: rank 0's run dir for all, only rank 0 writes Hydra outputs
            if config.resume:
                with open_dict(config):
                    config.hydra.run.dir = str(resume_dir(config.resume))
                created = None
            task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
            if env_rank() == 0:  # torchrun: rank 0 alone will hold the lock
                refuse_if_busy(Path(config.hydra.run.dir))  # before Hydra rewrites its .hydra/ there
            check_run_dir(Path(config.hydra.run.dir), task_cfg)
            if config.check:  # stop before Hydra creates the run directory
                from sdrun.launch.preflight import report
                report([(None, task_cfg, Path(config.hydra.run.dir))])
                raise SystemExit(0)
            if current().is_main:  # only rank 0 writes into the run directory, so only it undoes
                RUN_START = StartSnapshot.take(Path(config.hydra.run.dir), created, config.hydra.output_subdir)
        except Exception as e:
            raise GuardStop(e) from e

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from sdrun.ranks import launched_by_torchrun
        if launched_by_torchrun():
            raise GuardStop(ConfigError("sdrun train -m under torchrun: a sweep's jobs are separate runs; "
                                        "launch the sweep without torchrun (hydra/launcher=parallel or slurm)"))
        # Every job composed and checked before Hydra creates the sweep directory (sdrun.launch.preflight).
        try:
            from sdrun.launch.preflight import check_sweep, report
            jobs = check_sweep(config)
            if config.check:
                if jobs is None:
                    raise ConfigError("check=true with -m needs Hydra's basic sweeper (the one that lists its jobs)")
                report([(job.name, job.cfg, job.run_dir) for job in jobs])
                raise SystemExit(0)
        except Exception as e:
            raise GuardStop(e) from e
        # Jobs may write the summary from other processes (joblib, submitit); the CLI, in this
        # process, needs to know where it is to name failed jobs.
        global LAST_SWEEP_SUMMARY
        LAST_SWEEP_SUMMARY = Path(config.hydra.sweep.dir) / SWEEP_SUMMARY

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode is None or config.hydra.mode.name != "MULTIRUN":
            return
        summary_path = Path(config.hydra.sweep.dir) / SWEEP_SUMMARY
        failed = job_return.status.name != "COMPLETED"
        job = {"num": config.hydra.job.num, "overrides": list(job_return.overrides or []),
               "dir": config.hydra.runtime.output_dir, "status": "failed" if failed else "finished",
               "error": one_line(job_return._return_value) if failed else None}
        # Parallel launchers end jobs in several processes at once: read-modify-write under
        # an exclusive lock. A requeued job (SLURM preemption) replaces its earlier entry.
        with locked(summary_path.with_name(f".{SWEEP_SUMMARY}.lock")):
            try:
                summary = json.loads(summary_path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                summary = {"jobs": []}
            jobs = [j for j in summary["jobs"] if j["num"] != job["num"]] + [job]
            jobs.sort(key=lambda j: j["num"])
            write_json(summary_path, {"jobs": jobs, "failed": sum(j["status"] == "failed" for j in jobs)})
        global LAST_SWEEP_SUMMARY
        LAST_SWEEP_SUMMARY = summary_path




@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path`, held for the with-block, across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


LAST_SWEEP_SUMMARY: Path | None = None  # the CLI names it when a sweep ends with failed jobs


# ---------------------------------------------------------------- a run that never started

def first_missing(path: Path) -> Path | None:
    """The topmost of `path` and its ancestors that does not exist yet (what mkdir -p would create)."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


@dataclass
class StartSnapshot:
    """A run directory as it was before Hydra wrote into it, to put back if the run never starts.

    For a directory this run creates: where mkdir -p started (`created`). For one that existed
    (a resume, a reused directory): every file's size and times, and the content of Hydra's
    .hydra/ files, which a new attempt overwrites; train.log is only appended to."""
    run_dir: Path
    created: Path | None
    files: dict[Path, tuple[int, int, int, bytes | None]] = field(default_factory=dict)
    dirs: dict[Path, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def take(cls, run_dir: Path, created: Path | None, output_subdir: str | None) -> "StartSnapshot":
        snap = cls(run_dir.absolute(), created)
        if created is not None:
            return snap
        hydra_dir = snap.run_dir / output_subdir if output_subdir else None
        for root, _, names in os.walk(snap.run_dir):
            folder = Path(root)
            st = folder.stat()
            snap.dirs[folder] = (st.st_atime_ns, st.st_mtime_ns)
            for name in names:
                path = folder / name
                st = path.lstat()
                content = path.read_bytes() if folder == hydra_dir and path.is_file() else None
                snap.files[path] = (st.st_size, st.st_atime_ns, st.st_mtime_ns, content)
        return snap

    def epoch_completed(self) -> bool:
        """Whether this attempt got through an epoch: the trainer appends to metrics.jsonl after each."""
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.exists():
            return False
        if self.created is not None:
            return True
        st, before = metrics.stat(), self.files.get(metrics)
        return before is None or (st.st_size, st.st_mtime_ns) != (before[0], before[2])

    def undo(self) -> None:
        if self.epoch_completed():
            return
        close_log_files(self.run_dir)
        if self.created is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            for folder in self.run_dir.parents:  # the empty parents mkdir -p made for it
                if folder != self.created and self.created not in folder.parents:
                    break
                try:
                    folder.rmdir()
                except OSError:
                    break
            return
        for root, dirs, names in os.walk(self.run_dir, topdown=True):
            folder = Path(root)
            for name in list(dirs):
                if folder / name not in self.dirs:
                    shutil.rmtree(folder / name, ignore_errors=True)
                    dirs.remove(name)
            for name in names:
                if folder / name not in self.files:
                    (folder / name).unlink(missing_ok=True)
        for path, (size, atime, mtime, content) in self.files.items():
            try:
                st = path.lstat()
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_size, st.st_mtime_ns) == (size, mtime):
                continue
            if content is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            elif st is not None and st.st_size > size:  # appended to (train.log)
                os.truncate(path, size)
            else:
                continue
            os.utime(path, ns=(atime, mtime))
        for folder, (atime, mtime) in sorted(self.dirs.items(), key=lambda d: -len(d[0].parts)):
            if folder.exists():
                os.utime(folder, ns=(atime, mtime))


def close_log_files(run_dir: Path) -> None:
    """Close and detach the logging file handlers writing into run_dir (Hydra's train.log)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in list(lg.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(run_dir):
                lg.removeHandler(handler)
                handler.close()


def undo_failed_start(error: BaseException) -> None:
    """A single run stopped by bad input before its first epoch completed: leave its directory
    as it was found (removed if this run created it). Called by the CLI on a user error.

    A non-finite loss is not bad input but what training produced: that run did start, and
    keeps its directory (train.log) like any run that failed while training."""
    global RUN_START
    snapshot, RUN_START = RUN_START, None
    if snapshot is not None and not isinstance(error, FloatingPointError):
        snapshot.undo()


RUN_START: StartSnapshot | None = None  # set by RunDirGuard.on_run_start for the run in progress
