"""The Hydra callback that guards run directories and sweeps (conf/train.yaml registers it):
what only a callback can do, because it runs before Hydra writes into a directory or after a job.

- `RunDirGuard.on_run_start` checks a single run's directory *before* Hydra writes its
  .hydra/ snapshot into it (sdrun.launch.runs.check_run_dir: finished, another config's, busy),
  so a bad invocation never touches an existing run, and remembers what was there; with
  check=true it reports and stops (sdrun.launch.preflight). Under torchrun every rank takes
  rank 0's run directory (`share_run_dir`).
- `RunDirGuard.on_multirun_start` checks every job of a sweep before the first starts.
- `RunDirGuard.on_job_end`: a single run that failed on bad input before its first epoch
  leaves its directory as it was found (`StartSnapshot.undo`: the error.json the failed attempt
  wrote goes too, an earlier attempt's comes back); a sweep's job is recorded in
  `sweep_summary.json` with its overrides and error while the others finish.

A callback's Exception is turned into a warning by Hydra, so a refusal leaves on_run_start as
the BaseException `GuardStop`, which sdrun.launch.app unwraps into a one-line error.
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

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from sdrun.config import ConfigError
from sdrun.errors import UserError, one_line
from sdrun.files import write_json
from sdrun.launch.preflight import check_sweep, report
from sdrun.launch.runs import check_config, check_run_dir, resume_dir
from sdrun.liveness import refuse_if_busy
from sdrun.ranks import env_rank, launched_by_torchrun
from sdrun.rundir import ERROR, METRICS, SWEEP_SUMMARY

# What the user's input causes, reported on one line (sdrun.launch.app): sdrun's own errors,
# and Hydra's and OmegaConf's composition errors (an unknown key, a value of the wrong type,
# a bad override).
USER_ERRORS = (UserError, HydraException, OmegaConfBaseException)


class GuardStop(BaseException):
    """Carries an error out of a Hydra callback (Hydra turns a callback's Exception into a warning)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


@dataclass
class JobFailed:
    """What a single run's job returns when it ends on an error that sdrun reports on one line
    (sdrun.launch.app): on_job_end undoes the failed start, then the app raises the error."""
    error: BaseException


class RunDirGuard(Callback):
    """What only a callback can do: act on a run's directory before Hydra writes into it, and
    on each job's end. Everything else (the config's checks, training) is the job's."""

    def __init__(self) -> None:
        self.start: StartSnapshot | None = None  # the run directory as it was, for a failed start

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run: its directory checked before Hydra writes its .hydra/ snapshot there,
        so a bad invocation never touches an existing run; with check=true, report and stop."""
        try:
            check_config(config)  # the config's one check, before anything is written
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
                report([(None, task_cfg, Path(config.hydra.run.dir))])
                raise SystemExit(0)
            if env_rank() == 0:  # only rank 0 writes into the run directory, so only it undoes
                self.start = StartSnapshot.take(Path(config.hydra.run.dir), created, config.hydra.output_subdir)
        except Exception as e:
            raise GuardStop(e) from e

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Every job of the sweep composed and checked before Hydra creates the sweep directory."""
        if launched_by_torchrun():
            raise GuardStop(ConfigError("sdrun train -m under torchrun: a sweep's jobs are separate runs; "
                                        "launch the sweep without torchrun (hydra/launcher=parallel or slurm)"))
        try:
            jobs = check_sweep(config)
            if config.check:
                if jobs is None:
                    raise ConfigError("check=true with -m needs Hydra's basic sweeper (the one that lists its jobs)")
                report([(job.name, job.cfg, job.run_dir) for job in jobs])
                raise SystemExit(0)
        except Exception as e:
            raise GuardStop(e) from e

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        error = job_return._return_value if job_return.status.name != "COMPLETED" else None
        if config.hydra.mode is None or config.hydra.mode.name != "MULTIRUN":
            # A single run stopped by bad input before its first epoch completed leaves its
            # directory as it was found (removed if this run created it).
            returned = job_return._return_value
            if self.start is not None and isinstance(returned, JobFailed) and is_bad_input(returned.error):
                self.start.undo()
            self.start = None
            return
        summary_path = Path(config.hydra.sweep.dir) / SWEEP_SUMMARY
        job = {"num": config.hydra.job.num, "overrides": list(job_return.overrides or []),
               "dir": config.hydra.runtime.output_dir, "status": "failed" if error is not None else "finished",
               "error": one_line(error) if error is not None else None}
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
        if isinstance(error, BaseException):
            # The sweep ends by raising the first failed job's error (in this process or, from
            # another launcher's worker, unpickled with it): it names its summary for the CLI.
            error.sweep_summary = str(summary_path)


def is_bad_input(error: BaseException | None) -> bool:
    """An error the user's input caused (a config value, missing data, a busy or foreign run
    directory). A non-finite loss is not: that run did start, and keeps its directory
    (train.log) like any run that failed while training."""
    return isinstance(error, USER_ERRORS) and not isinstance(error, FloatingPointError)


# ---------------------------------------------------------------- Hydra under torchrun

def quiet_logging(rank: int) -> dict:
    """Hydra job_logging for ranks > 0: warnings and errors on the console, no train.log of
    their own and no second writer on rank 0's."""
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"simple": {"format": f"[rank {rank}][%(levelname)s] %(message)s"}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple",
                                     "stream": "ext://sys.stderr"}},
            "root": {"level": "WARNING", "handlers": ["console"]}}


def share_run_dir(config) -> None:
    """Under torchrun, before Hydra writes anything (RunDirGuard.on_run_start).

    Every rank composes its own config; `${now:...}` in the default run dir can resolve to
    a different second on each. Rank 0's directory is broadcast and used by all ranks, and
    ranks > 0 neither snapshot the config (.hydra/) nor write a train.log.
    """
    if not launched_by_torchrun():
        return
    from sdrun.engine import distributed  # torch's process group: only under torchrun

    ctx = distributed.current()
    if not ctx.distributed:
        return
    run_dir = distributed.broadcast_str(str(config.hydra.run.dir) if ctx.is_main else None, ctx)
    with open_dict(config):
        config.hydra.run.dir = run_dir
        if not ctx.is_main:
            config.hydra.output_subdir = None
            config.hydra.job_logging = quiet_logging(ctx.rank)


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
    .hydra/ files, which a new attempt overwrites, and of an earlier attempt's error.json, which
    a new attempt removes (sdrun.launch.app.train); train.log is only appended to."""
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
                kept = folder == hydra_dir or path == snap.run_dir / ERROR
                content = path.read_bytes() if kept and path.is_file() else None
                snap.files[path] = (st.st_size, st.st_atime_ns, st.st_mtime_ns, content)
        return snap

    def epoch_completed(self) -> bool:
        """Whether this attempt got through an epoch: the trainer appends to metrics.jsonl after each."""
        metrics = self.run_dir / METRICS
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
