"""Many runs at once: what one job of a parallel sweep may use of the machine.

Sweeps run through Hydra's launcher plugins (presets in conf/hydra/launcher/):
- `hydra/launcher=parallel`: hydra-joblib-launcher, n_jobs runs at a time on this machine.
- `hydra/launcher=slurm`: hydra-submitit-launcher, one SLURM job per run.
- `hydra/launcher=submitit_local`: submitit's local executor (tries the SLURM path locally).

With several jobs on one machine, `job_resources` gives each job
- its own GPU when several are visible: the job holds an exclusive lock on a GPU slot
  file in the sweep directory for as long as it runs, so two jobs never share a GPU even
  when joblib hands the next job to a worker while a slow one still holds its GPU;
  a job that finds every slot taken waits for one. Locks die with their process.
- its share of the CPU cores for torch's intra-op threads: cores / n_jobs for joblib,
  cpus_per_task for submitit (what SLURM gave the job).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger("sdrun")

GPU_LOCKS = ".gpu_slots"  # in the sweep directory: one lock file per GPU


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_local_jobs() -> int:
    """`${local_jobs:}` in conf/hydra/launcher/parallel.yaml: one job per visible GPU, else one per 4 cores."""
    import torch

    gpus = torch.cuda.device_count()
    return gpus if gpus > 0 else max(1, available_cores() // 4)


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("local_jobs", default_local_jobs, use_cache=True, replace=True)


register_resolvers()  # at import: the sweep's parent and every job process import this module


def concurrent_jobs(launcher) -> int:
    """How many jobs of the sweep run at once on this machine (1 for the basic launcher)."""
    target = str(launcher.get("_target_", ""))
    if "JoblibLauncher" in target:
        n = int(launcher.n_jobs)
        return n if n > 0 else max(1, available_cores() + 1 + n)  # joblib: -1 = all cores, -2 = all but one
    return 1


def threads_per_job(launcher) -> int | None:
    """torch intra-op threads for one job, or None to keep torch's default."""
    target = str(launcher.get("_target_", ""))
    if "submitit" in target and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    jobs = concurrent_jobs(launcher)
    return max(1, available_cores() // jobs) if jobs > 1 else None


@contextlib.contextmanager
def gpu_slot(sweep_dir: Path, num_gpus: int, poll_s: float = 2.0) -> Iterator[int]:
    """Hold an exclusive lock on one of num_gpus slot files; yield its index."""
    folder = Path(sweep_dir) / GPU_LOCKS
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(num_gpus):
            f = open(folder / f"{index}.lock", "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield index
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        if not waited:
            log.info("all %d GPUs are taken by other jobs of this sweep; waiting for one", num_gpus)
            waited = True
        time.sleep(poll_s)


@contextlib.contextmanager
def job_resources(cfg, hydra_cfg) -> Iterator[None]:
    """Inside one job of a multirun: pick its GPU and CPU threads (no-op for a single run)."""
    if hydra_cfg.mode is None or hydra_cfg.mode.name != "MULTIRUN":
        yield
        return
    import torch

    threads = threads_per_job(hydra_cfg.launcher)
    if threads is not None:
        torch.set_num_threads(threads)
    num_gpus = torch.cuda.device_count() if cfg.device == "auto" else 0
    if num_gpus <= 1:  # nothing to share out (SLURM and submitit give each job its own)
        yield
        return
    with gpu_slot(Path(hydra_cfg.sweep.dir), num_gpus) as index:
        cfg.device = f"cuda:{index}"  # a runtime-only setting: results and resume are unaffected
        log.info("job %s: GPU cuda:%d, %s CPU threads", hydra_cfg.job.num, index, torch.get_num_threads())
        yield
