"""Pre-flight: find out whether a run or a whole sweep can work, and how long it will train,
before it spends GPU hours.

- `sweep_jobs` lists the jobs a `-m` sweep will launch, with Hydra's own machinery: the
  BasicSweeper's expansion of the preset's `hydra.sweeper.params` plus the command line's
  sweep overrides (the command line wins for a key in both), each job's config composed by
  Hydra's config loader exactly as the launcher will compose it.
- `job_problem` checks one composed job without training: `check_config` (ranges, depth for
  the architecture, device available), the dataset's files present and readable
  (`sdrun.data.readers.find_data`; in image folders, CIFAR's and ImageNet's, the first 3 image
  files of each class folder opened and PIL-verified), and its run directory not holding
  another config's run.
- `check_sweep` (RunDirGuard.on_multirun_start) runs both for every job: if any would fail,
  one error line per bad job on stderr and nothing is launched (exit 2). It runs before
  Hydra creates the sweep directory, so a rejected sweep leaves nothing on disk.
- `check=true` (`report`): for a run or every job of a sweep, builds everything up to the
  first step (data read, model built, device), prints the resolved setting, times a few
  real training steps (`sdrun.engine.loop.train_step` on the run's own batches and gates) and
  projects the training time; then exits 0 without writing into runs/ or multirun/.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from sdrun.config import ConfigError, flatten, to_plain
from sdrun.engine.schedule import epochs_per_lr, lr_at
from sdrun.errors import UserError, one_line, print_error
from sdrun.launch.runs import AlreadyFinished, check_config, check_run_dir
from sdrun.launch.sweeps import BASIC_SWEEPER, expand_sweep
from sdrun.text import duration

WARMUP_STEPS = 3   # excluded from the timing: allocator, cuDNN autotuning, lazy initialisation
TIMED_STEPS = 10


@dataclass
class Job:
    num: int
    overrides: list[str]
    cfg: DictConfig | None = None   # the task config (no hydra node); None if it did not compose
    run_dir: Path | None = None
    problem: str | None = None
    label: list[str] | None = None  # the overrides that tell it apart from the sweep's other jobs

    @property
    def name(self) -> str:
        return f"job {self.num} ({' '.join(self.overrides if self.label is None else self.label) or 'no overrides'})"


# ---------------------------------------------------------------- the sweep's jobs

def sweep_jobs(config: DictConfig) -> list[Job] | None:
    """Every job of the sweep `config` (the multirun's master config), composed; None when
    the sweeper is not Hydra's basic one (its jobs cannot be known in advance)."""
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    loader = GlobalHydra.instance().config_loader()
    overrides_per_job = expand_sweep(sweeper.get("params"), OmegaConf.to_container(config.hydra.overrides.task,
                                                                                  resolve=False), loader)
    jobs, previous = [], HydraConfig.instance().cfg
    try:
        for num, overrides in enumerate(overrides_per_job):
            job = Job(num, [o for o in overrides if not o.startswith("hydra.")])
            jobs.append(job)
            try:
                job_cfg = loader.load_sweep_config(config, list(overrides))
                with open_dict(job_cfg):  # as the launchers number them, so sweep.subdir resolves
                    job_cfg.hydra.job.id = job_cfg.hydra.job.num = num
                HydraConfig.instance().set_config(job_cfg)  # ${hydra:...} resolves as in the job
                job.run_dir = Path(str(job_cfg.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)
                job.cfg = OmegaConf.masked_copy(job_cfg, [k for k in job_cfg if k != "hydra"])
            except Exception as e:  # a value of the wrong type, an unknown key or group
                job.problem = one_line(e)
    finally:
        HydraConfig.instance().cfg = previous
    # Name each job by the values that tell it apart from the others (all of them for one job).
    keys = [{o.split("=", 1)[0]: o for o in job.overrides} for job in jobs]
    varying = {k for k in set().union(*keys) if len({kv.get(k) for kv in keys}) > 1} if len(jobs) > 1 else None
    for job, kv in zip(jobs, keys):
        job.label = [o for k, o in kv.items() if varying is None or k in varying]
    return jobs


def job_problem(cfg: DictConfig, run_dir: Path | None, device_here: bool = True,
                data_cache: dict | None = None) -> str | None:
    """Why this job would fail before training, or None. `device_here=False` for launchers
    that run the job on another machine (SLURM): its device is not checked here."""
    try:
        check_config(cfg, device_here)
    except ConfigError as e:
        return str(e)
    # Imported after the range checks: torch takes seconds to import, which a sweep with a bad
    # value should not wait for.
    from sdrun.data.readers import find_data

    ds = cfg.dataset
    key = (ds.name, ds.root, str(ds.format), ds.download, ds.image_size)  # what find_data reads
    cache = {} if data_cache is None else data_cache
    if key not in cache:
        cache[key] = find_data(ds)
    if cache[key]:
        return cache[key]
    if run_dir is not None:
        try:
            check_run_dir(run_dir, cfg)
        except AlreadyFinished:  # the job will say so and skip: not a failure
            pass
        except Exception as e:  # another config's checkpoint, an unreadable one
            return one_line(e)
    return None


def runs_elsewhere(launcher: DictConfig) -> bool:
    """Jobs submitted to SLURM run on other nodes: the device there is not this machine's."""
    return "SlurmLauncher" in str(launcher.get("_target_", ""))


def check_sweep(config: DictConfig) -> list[Job] | None:
    """All jobs of the sweep, checked; raises ConfigError (after one stderr line per bad job)
    if any would fail. Returns the jobs (None for a sweeper whose jobs are not known ahead)."""
    t0 = time.perf_counter()
    jobs = sweep_jobs(config)
    if jobs is None:
        print(f"sdrun train: pre-flight skipped: the sweeper {config.hydra.sweeper.get('_target_')} "
              f"chooses its jobs while it runs", file=sys.stderr)
        return None
    device_here, cache = not runs_elsewhere(config.hydra.launcher), {}
    for job in jobs:
        if job.problem is None:
            job.problem = job_problem(job.cfg, job.run_dir, device_here, cache)
    bad = [j for j in jobs if j.problem]
    for job in bad:
        print_error("sdrun train", f"{job.name}: {job.problem}")
    if bad:
        raise ConfigError(f"sweep not launched: {len(bad)} of {len(jobs)} jobs would fail (listed above); "
                          f"nothing was started")
    print(f"sdrun train: pre-flight: {len(jobs)} jobs composed and checked in {time.perf_counter() - t0:.2f} s",
          flush=True)
    return jobs


# ---------------------------------------------------------------- check=true

@dataclass
class Timing:
    step_s: float          # mean seconds per training step over the timed steps
    active_mean: float     # blocks run per timed step, on average
    peak_memory: str


def time_steps(cfg: DictConfig) -> tuple[dict, Timing]:
    """Build the run as `sdrun train` does (sdrun.engine.setup.build_run) and time TIMED_STEPS
    of its real training epochs' steps after WARMUP_STEPS; returns (facts, timing)."""
    # torch and the training engine only now: a sweep's pre-flight imports this module and
    # answers a bad setting before torch's import (seconds).
    import torch

    from sdrun.engine.optim import set_lr
    from sdrun.engine.runtime import synchronize
    from sdrun.engine.setup import build_run

    t0 = time.perf_counter()
    run = build_run(cfg)  # check=true runs in one process
    load_s = time.perf_counter() - t0
    rt, state = run.rt, run.state
    set_lr(state.optimizer, lr_at(0, cfg.optim))
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    run.model.train()

    run_steps(run, WARMUP_STEPS)
    synchronize(rt.device)
    t1 = time.perf_counter()
    active = run_steps(run, TIMED_STEPS)
    synchronize(rt.device)
    step_s = (time.perf_counter() - t1) / TIMED_STEPS
    peak = (f"{torch.cuda.max_memory_allocated(rt.device) / 2**30:.2f} GiB allocated on the GPU"
            if rt.device.type == "cuda" else "-")
    facts = {"rt": rt, "data": run.data, "load_s": load_s, "probs": list(run.model.survival_probs),
             "expected": run.expected_depth, "params": sum(p.numel() for p in run.model.parameters()),
             "steps_per_epoch": len(state.batches),
             "device_name": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else
             f"{torch.get_num_threads()} CPU threads"}
    del run, state
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    return facts, Timing(step_s, active / TIMED_STEPS, peak)


def run_steps(run, n: int) -> int:
    """n training steps of `run`, as train_epoch makes them (epochs restart as needed); blocks run."""
    from sdrun.engine.loop import EpochStats, train_step  # torch: as in time_steps, only for check=true

    state, rt = run.state, run.rt
    done = active = 0
    while done < n:
        stats = EpochStats.zeros(rt.device)
        for step, (x, y) in enumerate(state.batches, start=1):
            g = state.gates.draw()
            loss, logits = train_step(run.net, state.optimizer, x, y, g, rt, grad_stats=run.grad_stats)
            stats.add(step, loss, logits, y, g)
            done, active = done + 1, active + sum(g)
            if done == n:
                break
        float(stats.loss_sum)  # the epoch's one read-back, as the trainer makes it
    return active


def describe(cfg: DictConfig, facts: dict, timing: Timing, epochs_left: int) -> tuple[list[str], float]:
    """The check's report lines and the projected training seconds."""
    rt, data, probs = facts["rt"], facts["data"], facts["probs"]
    L, expected, device = len(probs), facts["expected"], facts["device_name"]
    spe = facts["steps_per_epoch"]
    total_steps = spe * epochs_left
    seconds = total_steps * timing.step_s
    o = cfg.optim
    # Epochs at each lr, as the run will count them (optim.epoch_base: paper or reference reading)
    segments = ", ".join(f"{lr:g} x {n}" for lr, n in epochs_per_lr(cfg.epochs, o))
    schedule = f"lr {segments} epochs (milestones {list(o.milestones)}, epoch_base {o.epoch_base})" + \
        f"; SGD momentum {o.momentum:g}{' nesterov' if o.nesterov else ''}, weight decay {o.weight_decay:g}"
    val = len(data.val) if data.val is not None else 0
    lines = [
        f"dataset     {cfg.dataset.name} ({'embedded' if cfg.dataset.name == 'digits' else cfg.dataset.root}): {len(data.train)} train / {val} val / "
        f"{len(data.test)} test images, {len(data.classes)} classes (read and built in {facts['load_s']:.1f} s)",
        f"model       depth {cfg.depth} ({cfg.model.arch}), L = {L} blocks, {facts['params'] / 1e6:.2f}M parameters",
        f"survival    {cfg.survival}: p_1 = {probs[0]:.4f} ... p_L = {probs[-1]:.4f}; expected active blocks "
        f"{expected:.2f} of {L} ({100 * expected / L:.1f} %)",
        f"device      {rt.device} ({device}), precision {rt.precision} (eval {rt.eval_precision}), channels_last "
        f"{'on' if rt.channels_last else 'off'}, speed {cfg.speed}, "
        f"loader {cfg.dataset.loader}",
        f"schedule    {epochs_left} epochs x {spe} steps (batch {cfg.batch_size}) = {total_steps} steps; {schedule}",
        f"step time   {f'{timing.step_s * 1e3:.1f} ms' if timing.step_s < 1 else f'{timing.step_s:.2f} s'} (mean of {TIMED_STEPS} real steps after {WARMUP_STEPS} warm-up; "
        f"{timing.active_mean:.1f} blocks ran per timed step, {expected:.1f} expected); peak memory {timing.peak_memory}",
        f"projected   {duration(seconds, days=False)} of training for the whole run (steps x step time; evaluation and "
        f"checkpoints excluded)",
    ]
    return lines, seconds


def epochs_left(cfg: DictConfig, run_dir: Path | None) -> int:
    """Epochs still to train: all of them, or those after a resumable checkpoint."""
    saved = check_run_dir(run_dir, cfg) if run_dir is not None else None
    return cfg.epochs - (saved.epoch if saved is not None else 0)


def report(jobs: list[tuple[str | None, DictConfig, Path | None]], out=None) -> float:
    """check=true: print each job's setting, timing and projection, and the sweep's total.

    Jobs whose settings differ only in the seed share one timing (same model, same work)."""
    out = out or sys.stdout  # the current one, not the one when this module was imported
    print("sdrun train: check=true: setting, data, model and a few timed steps; nothing is trained or written",
          file=out, flush=True)
    total, timings = 0.0, {}
    for name, cfg, run_dir in jobs:
        if name:
            print(f"\n{name}", file=out)
        try:
            left = epochs_left(cfg, run_dir)
        except AlreadyFinished as e:
            print(f"  {e}", file=out)
            continue
        key = repr(sorted((k, v) for k, v in flatten(to_plain(cfg)).items() if k not in ("seed", "check")))
        shared = timings.get(key)
        if shared is None:
            try:
                shared = timings[key] = (*time_steps(cfg), name)
            except UserError as e:  # data that is there but unreadable, found when it is read
                if name is None:
                    raise
                raise ConfigError(f"{name}: {one_line(e)}") from None
        facts, timing, timed_as = shared
        lines, seconds = describe(cfg, facts, timing, left)
        if timed_as != name:
            lines[-2] += f" [timed once for {timed_as.split(' (')[0]}: the same setting but the seed]"
        for line in lines:
            print(f"  {line}", file=out, flush=True)
        total += seconds
    if len(jobs) > 1:
        print(f"\nsweep       {len(jobs)} jobs: {duration(total, days=False)} of training in all, one job at a "
              f"time on this device (evaluation and checkpoints excluded)", file=out, flush=True)
    return total
