"""Many runs at once: what one job of a parallel sweep may use of the machine.

Sweeps run through Hydra's launcher plugins (presets in conf/hydra/launcher/):
- `hydra/launcher=parallel`: hydra-joblib-launcher, n_jobs runs at a time on this machine.
- `hydra/launcher=slurm`: hydra-submitit-launcher, one SLURM job per run.
- `hydra/launcher=submitit_local`: submitit's local executor (tries the SLURM path locally).

With several jobs on one machine, `job_resources` gives each job
- one of `jobs_per_gpu` (K) slots on a visible GPU: the job holds an exclusive lock on a
  slot file in the sweep directory for as long as it runs, so no GPU ever runs more than K
  jobs of the sweep, even when joblib hands the next job to a worker while a slow one still
  holds its slot; a new job goes to the GPU with the fewest jobs, and waits only when every
  slot of every GPU is taken. Locks die with their process. K > 1 shares a GPU between
  several launch-bound runs (a CIFAR ResNet-110 leaves most of a large GPU idle);
  n_jobs defaults to K x GPUs.
- its share of the CPU cores for torch's intra-op threads: cores / (jobs running at once)
  for joblib, i.e. cores / (K x GPUs) by default; cpus_per_task for submitit (what SLURM
  gave the job).
`jobs_per_gpu` is sdrun's key in the parallel preset, not joblib's: `LauncherOptions`
takes it out of the launcher config before Hydra builds the joblib launcher (which hands
every key to joblib.Parallel); each job's own config still holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from sdrun.config import ConfigError
from sdrun.launch.guard import GuardStop

log = logging.getLogger("sdrun")

GPU_LOCKS = ".gpu_slots"  # in the sweep directory: one lock file per GPU slot, one for choosing


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> int:
    import torch  # only when ${local_jobs:} resolves: every `sdrun train` imports this module

    return torch.cuda.device_count()


def default_local_jobs(jobs_per_gpu: int = 1, gpus: int | None = None) -> int:
    """`${local_jobs:K}` in conf/hydra/launcher/parallel.yaml: K jobs per visible GPU, else one per 4 cores."""
    gpus = visible_gpus() if gpus is None else gpus
    return int(jobs_per_gpu) * gpus if gpus > 0 else max(1, available_cores() // 4)


def register_resolvers() -> None:
    """${local_jobs:K}, and the parallel preset's schema (joblib's, plus jobs_per_gpu)."""
    OmegaConf.register_new_resolver("local_jobs", default_local_jobs, use_cache=True, replace=True)
    try:
        from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
    except ImportError:  # the launchers extra is not installed; hydra/launcher=parallel says so
        return

    @dataclass
    class JoblibSlotsConf(JobLibLauncherConf):
        jobs_per_gpu: int = 1  # K: jobs sharing each visible GPU (sdrun's key, see LauncherOptions)

    ConfigStore.instance().store(group="hydra/launcher", name="joblib_slots", node=JoblibSlotsConf, provider="sdrun")


register_resolvers()  # at import: the sweep's parent and every job process import this module


def concurrent_jobs(launcher) -> int:
    """How many jobs of the sweep run at once on this machine (1 for the basic launcher)."""
    target = str(launcher.get("_target_", ""))
    if "JoblibLauncher" in target:
        n = int(launcher.n_jobs)
        return n if n > 0 else max(1, available_cores() + 1 + n)  # joblib: -1 = all cores, -2 = all but one
    return 1


def jobs_per_gpu(launcher) -> int:
    return int(launcher.get("jobs_per_gpu") or 1)


def threads_per_job(launcher, num_gpus: int = 0) -> int | None:
    """torch intra-op threads for one job, or None to keep torch's default.

    Joblib: cores / (jobs running at once), which is n_jobs, or K x GPUs when fewer slots
    than n_jobs exist (the others wait for a slot).
    """
    target = str(launcher.get("_target_", ""))
    if "submitit" in target and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    jobs = concurrent_jobs(launcher)
    if num_gpus > 0:
        jobs = min(jobs, jobs_per_gpu(launcher) * num_gpus)
    return max(1, available_cores() // jobs) if jobs > 1 else None


def _try_lock(path: Path):
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _release(f) -> None:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def claim_slot(folder: Path, num_gpus: int, per_gpu: int = 1):
    """One attempt: (gpu, open locked slot file) on the GPU with the fewest held slots, or None
    when every slot is taken.

    Choosing is serialised by a lock on `choose.lock`, so the probes of one claimer (which
    briefly lock free slots to see which are free) never make another claimer think a slot
    is taken. Slots are only released outside it, which can only make a busy slot free.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "choose.lock", "a") as chooser:
        fcntl.flock(chooser, fcntl.LOCK_EX)  # blocking: held for a few file operations
        try:
            free = {gpu: [] for gpu in range(num_gpus)}
            for gpu in range(num_gpus):
                for slot in range(per_gpu):
                    f = _try_lock(folder / f"gpu{gpu}_slot{slot}.lock")
                    if f is not None:
                        free[gpu].append(f)
            candidates = [gpu for gpu in range(num_gpus) if free[gpu]]
            # Fewest jobs = most free slots; ties go to the lowest index.
            best = max(candidates, key=lambda gpu: (len(free[gpu]), -gpu)) if candidates else None
            chosen = free[best].pop(0) if best is not None else None
            for files in free.values():
                for f in files:
                    _release(f)
        finally:
            fcntl.flock(chooser, fcntl.LOCK_UN)
    return None if chosen is None else (best, chosen)


@contextlib.contextmanager
def gpu_slot(sweep_dir: Path, num_gpus: int, poll_s: float = 2.0, per_gpu: int = 1) -> Iterator[int]:
    """Hold an exclusive lock on one of per_gpu slots of one of num_gpus GPUs; yield the GPU index."""
    folder = Path(sweep_dir) / GPU_LOCKS
    waited = False
    while True:
        got = claim_slot(folder, num_gpus, per_gpu)
        if got is not None:
            gpu, f = got
            try:
                yield gpu
            finally:
                _release(f)
            return
        if not waited:
            log.info("all %d slots (%d per GPU) are taken by other jobs of this sweep; waiting for one",
                     num_gpus * per_gpu, per_gpu)
            waited = True
        time.sleep(poll_s)


class LauncherOptions(Callback):
    """Takes sdrun's own keys (jobs_per_gpu) out of the launcher config before Hydra builds
    the launcher from it; registered in conf/train.yaml's hydra.callbacks."""

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if "jobs_per_gpu" not in launcher:
            return
        # Hydra turns a callback's Exception into a warning; the sweep must stop instead.
        try:
            k = launcher.jobs_per_gpu
            if k < 1:
                raise ConfigError(f"hydra.launcher.jobs_per_gpu={k} must be at least 1")
            # Resolve n_jobs (${local_jobs:${.jobs_per_gpu}}) while jobs_per_gpu is still there.
            plain = OmegaConf.to_container(launcher, resolve=True)
            del plain["jobs_per_gpu"]
            config.hydra.launcher = OmegaConf.create(plain)
        except Exception as e:
            raise GuardStop(e) from e


@contextlib.contextmanager
def job_resources(cfg, hydra_cfg) -> Iterator[None]:
    """Inside one job of a multirun: pick its GPU and CPU threads (no-op for a single run)."""
    if hydra_cfg.mode is None or hydra_cfg.mode.name != "MULTIRUN":
        yield
        return
    import torch  # a sweep's job, about to train: not when this module is imported for every `sdrun train`

    launcher = hydra_cfg.launcher
    num_gpus = visible_gpus() if cfg.device == "auto" else 0
    threads = threads_per_job(launcher, num_gpus)
    if threads is not None:
        torch.set_num_threads(threads)
    # Joblib: K slots per GPU, even with one GPU (more jobs than slots wait). Other launchers:
    # one job per GPU where a job sees several (SLURM gives each job its own, so it sees one).
    joblib = "JoblibLauncher" in str(launcher.get("_target_", ""))
    if num_gpus == 0 or (num_gpus == 1 and not joblib):
        yield
        return
    with gpu_slot(Path(hydra_cfg.sweep.dir), num_gpus, per_gpu=jobs_per_gpu(launcher)) as index:
        cfg.device = f"cuda:{index}"  # a runtime-only setting: results and resume are unaffected
        torch.cuda.set_device(index)  # anything that uses "the current device" lands there too
        log.info("job %s: GPU cuda:%d (up to %d jobs per GPU), %s CPU threads", hydra_cfg.job.num, index,
                 jobs_per_gpu(launcher), torch.get_num_threads())
        yield
