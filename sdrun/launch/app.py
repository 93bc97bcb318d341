"""`sdrun train`: the Hydra app. One job = its config checked, its run directory checked and
leased, the run built and fit.

Hydra composes the config (conf/, the schema of sdrun.config), runs `-m` sweeps, `--cfg`,
`--help`; the callback in sdrun.launch.guard acts on run directories before Hydra writes into
them and on each job's end. Errors reach the user as one line (exit 2): Hydra is asked to
raise (HYDRA_FULL_ERROR=1 internally) and sdrun formats the error itself; HYDRA_FULL_ERROR=1
from the user still shows the full traceback.

torch is imported only once a job's config has passed its checks (in `train`), so a bad
setting is answered in the time Hydra takes to compose.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sdrun.config import ConfigError
from sdrun.errors import one_line, print_error
from sdrun.files import write_json
from sdrun.launch.compose import register_configs
from sdrun.launch.guard import USER_ERRORS, GuardStop, JobFailed
from sdrun.launch.launchers import job_resources, register_resolvers
from sdrun.launch.runs import AlreadyFinished, check_run_dir
from sdrun.liveness import Lease
from sdrun.ranks import launched_by_torchrun
from sdrun.rundir import ERROR, HEADLINE

USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"

# Hydra runs one of these modes per call and raises a bare ValueError (a traceback) on two.
MODES = {"-m": "-m/--multirun", "--multirun": "-m/--multirun", "-c": "--cfg", "--cfg": "--cfg",
         "-i": "--info", "--info": "--info", "-r": "--run", "--run": "--run", "-sc": "--shell-completion",
         "--shell-completion": "--shell-completion"}


def main(argv: list[str]) -> int:
    """`sdrun train ARGV`; returns the exit code."""
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # Hydra's argparse takes its overrides as one positional list, so a flag after the first
    # override (`sdrun train dataset=cifar10 -m pL=0.2,0.5`) ends in an 8-line usage error:
    # the flag goes first. -m is the only one that is a bare switch among the overrides.
    argv = [a for a in argv if a in ("-m", "--multirun")] + [a for a in argv if a not in ("-m", "--multirun")]
    sys.argv = ["sdrun train", *argv]
    torchrun = launched_by_torchrun()
    if torchrun:  # every process runs this; they join one process group before Hydra composes
        from sdrun.engine import distributed  # torch's process group: only under torchrun
        distributed.init()
    try:
        check_hydra_modes(argv)
        hydra_app()
    except AlreadyFinished as e:  # the run is done (a re-run script, a requeued job): nothing to do
        print(f"sdrun train: {e}", file=sys.stderr)
        return 0
    except USER_ERRORS as e:
        if USER_FULL_ERROR:
            raise
        print_error("sdrun train", e, sweep_note(e))
        return 2
    finally:
        if torchrun:
            distributed.teardown()
    return 0


def hydra_app() -> None:
    register_configs()
    register_resolvers()  # ${local_jobs:} in the hydra/launcher=parallel preset

    failed: list[BaseException] = []  # a single run's error, raised once Hydra has returned

    @hydra.main(version_base="1.3", config_path="pkg://sdrun.conf", config_name="train")
    def job(cfg: DictConfig) -> float | JobFailed | None:
        hc = HydraConfig.get()
        multirun = hc.mode.name == "MULTIRUN"
        progress = {"on": True, "off": False}.get(cfg.progress.value, sys.stdout.isatty() and not multirun)
        try:
            with job_resources(cfg, hc):  # a parallel sweep's job: its own GPU, its share of the cores
                results = train(cfg, hc.runtime.output_dir, progress=progress)
        except USER_ERRORS as e:
            if multirun:  # Hydra finishes the other jobs, then the sweep ends with this error
                raise
            # Returned, not raised: Hydra would print its own multi-line report of it. The
            # callback's on_job_end sees it and undoes a failed start.
            failed.append(e)
            return JobFailed(e)
        return None if results is None else results[HEADLINE]

    try:
        job()
    except GuardStop as stop:  # the callback refused before Hydra wrote into the run directory
        raise stop.error from None
    if failed:
        raise failed[0]


def train(cfg: DictConfig, run_dir: str | Path, progress: bool = False) -> dict | None:
    """One run: its run directory checked and leased, the run built and fit. Returns
    results.json's content; None for a finished run in a sweep (a requeued job: nothing to do).

    The config was checked before (sdrun.launch.runs.check_config: by the callback for a run,
    by the pre-flight for every job of a sweep), so torch is imported only for a good one."""
    # The engine (torch) only here, once the config has passed its checks.
    from sdrun.engine import distributed
    from sdrun.engine.loop import Interrupted, fit
    from sdrun.engine.setup import build_run

    ctx = distributed.init()
    if cfg.batch_size < ctx.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is the global batch; it must be at least "
                          f"the number of processes ({ctx.world_size})")
    if ctx.distributed and cfg.dataset.name != "imagenet" and str(cfg.dataset.loader) != "device":
        # The device path and ImageNet's loader shard each global batch; the CIFAR DataLoader path does not.
        raise ConfigError("torchrun runs use dataset.loader=device for cifar10, cifar100, svhn and digits "
                          "(dataset.loader=dataloader does not shard its batches across processes)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        saved = check_run_dir(run_dir, cfg)  # None for a new run; raises if finished or foreign
    except AlreadyFinished as e:
        if not is_multirun():
            raise
        print(f"sdrun train: {e}", file=sys.stderr)  # a sweep's requeued job: the others go on
        return None
    with Lease(run_dir) as lease:  # lock + heartbeat while training, for `sdrun status` (sdrun.liveness)
        if ctx.is_main:
            lease.acquire()  # after the check: a finished or foreign run's directory stays untouched
            (run_dir / ERROR).unlink(missing_ok=True)  # an earlier attempt's error: this one trains again
        try:
            return fit(build_run(cfg, ctx, saved), run_dir, progress)
        except Interrupted as e:  # preemption or Ctrl-C: stop (a sweep too), resumable
            print(f"sdrun train: {e}", file=sys.stderr)
            raise SystemExit(128 + e.signum) from None  # the shell's convention
        except Exception as e:
            if ctx.is_main:
                record_error(run_dir, e)
            raise


def record_error(run_dir: Path, error: BaseException) -> None:
    """error.json: the run stopped on this error, for `sdrun status` (state failed, the error
    line). Written while the run holds its lease; a run that never started has it removed with
    the rest by the callback's undo (sdrun.launch.guard.StartSnapshot), and the next attempt
    removes it when it acquires the lease. Writing it never hides the error itself."""
    try:
        write_json(run_dir / ERROR, {"error": one_line(error), "type": type(error).__name__, "time": time.time()})
    except OSError:
        pass


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def check_hydra_modes(argv: list[str]) -> None:
    used = list(dict.fromkeys(MODES[a.split("=")[0]] for a in argv if a.split("=")[0] in MODES))
    if len(used) > 1:
        raise ConfigError(f"{' and '.join(used)} cannot be combined (Hydra does one of them per call); to see the "
                          "config of one job of a sweep (or its launcher settings), drop -m and give one value "
                          "per key, e.g. sdrun train pL=0.5 seed=1 --cfg job (or --cfg hydra)")


def sweep_note(error: BaseException) -> str:
    """For a sweep that ended with failed jobs: how many, and where the summary is (the failed
    job's error names it: sdrun.launch.guard.RunDirGuard.on_job_end)."""
    path = getattr(error, "sweep_summary", None)
    if path is None or not Path(path).is_file():
        return ""
    jobs = json.loads(Path(path).read_text())["jobs"]
    failed = [f"job {j['num']} ({','.join(j['overrides'])})" for j in jobs if j["status"] == "failed"]
    if not failed:
        return ""
    return (f" [sweep: {len(failed)} of {len(jobs)} jobs failed: {'; '.join(failed)}; the others' results "
            f"are kept; see {path}]")
