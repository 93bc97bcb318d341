"""`sdrun train`: the Hydra app. One job = check its run directory, hold its lease, train.

The only layer that knows Hydra: the config is composed here (conf/, sdrun.config's schema),
the callback in sdrun.launch.guard guards run directories and sweeps, and the job itself
(`train`) checks the directory, takes the lock and hands the run to the engine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from sdrun.config import ConfigError, validate
from sdrun.engine import distributed
from sdrun.engine.loop import fit
from sdrun.engine.setup import build_run
from sdrun.errors import UserError, print_error
from sdrun.launch.runs import check_run_dir
from sdrun.liveness import Lease
from sdrun.ranks import Context, launched_by_torchrun


def main(argv: list[str]) -> int:
    return run_train(argv)


def train(cfg: DictConfig, run_dir: str | Path, progress: bool = False) -> dict:
    """One run: the config checked, the run directory checked and leased, the run built and fit."""
    ctx = check_launch(cfg)  # torchrun's rank and world size; one process without torchrun
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = check_run_dir(run_dir, cfg)  # None for a new run; raises if finished or foreign
    with Lease(run_dir) as lease:  # lock + heartbeat while training, for `sdrun status` (sdrun.liveness)
        if ctx.is_main:
            lease.acquire()  # after the check: a finished or foreign run's directory stays untouched
        return fit(build_run(cfg, ctx, saved), run_dir, progress)


def check_launch(cfg: DictConfig) -> Context:
    """Validate the config and the process layout; join torchrun's process group if there is one."""
    validate(cfg)
    ctx = distributed.init()
    if cfg.batch_size < ctx.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is the global batch; it must be at least "
                          f"the number of processes ({ctx.world_size})")
    if ctx.distributed and cfg.dataset.name != "imagenet" and str(cfg.dataset.loader) != "device":
        # The device path and ImageNet's loader shard each global batch; the CIFAR DataLoader path does not.
        raise ConfigError("torchrun runs use dataset.loader=device for cifar10, cifar100, svhn and digits "
                          "(dataset.loader=dataloader does not shard its batches across processes)")
    return ctx


def _hydra_train() -> None:
    import hydra

    from sdrun.launch.compose import register_configs
    from sdrun.launch.launchers import register_resolvers

    register_configs()
    register_resolvers()  # ${local_jobs:} in the hydra/launcher=parallel preset

    @hydra.main(version_base="1.3", config_path="pkg://sdrun.conf", config_name="train")
    def app(cfg) -> float | None:
        from hydra.core.hydra_config import HydraConfig

        from sdrun.launch.launchers import job_resources
        from sdrun.rundir import HEADLINE
        from sdrun.launch.guard import undo_failed_start
        from sdrun.launch.runs import AlreadyFinished
        from sdrun.engine.loop import Interrupted

        hc = HydraConfig.get()
        multirun = hc.mode.name == "MULTIRUN"
        progress = {"on": True, "off": False}.get(cfg.progress.value, sys.stdout.isatty() and not multirun)
        try:
            with job_resources(cfg, hc):  # a parallel sweep's job: its own GPU, its share of the cores
                results = train(cfg, hc.runtime.output_dir, progress=progress)
        except AlreadyFinished as e:  # a requeued job whose run is done: nothing to do
            print(f"sdrun train: {e}", file=sys.stderr)
            return None
        except Interrupted as e:  # preemption or Ctrl-C: stop the whole sweep too
            print(f"sdrun train: {e}", file=sys.stderr)
            raise SystemExit(128 + e.signum) from None  # the shell's convention
        except _user_errors() as e:
            if not multirun:  # a run that never completed an epoch leaves its directory as it found it
                undo_failed_start(e)
            # In a sweep, raise: Hydra finishes the other jobs, then reports which one failed.
            if multirun or _USER_FULL_ERROR:
                raise
            _print_error(e)
            raise SystemExit(2) from None
        return results[HEADLINE]

    app()


def _user_errors() -> tuple[type[BaseException], ...]:
    """What `sdrun train` reports on one line: sdrun's own, and Hydra's and OmegaConf's
    composition errors (an unknown key, a value of the wrong type, a bad override)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (UserError, HydraException, OmegaConfBaseException)


def _print_error(e: BaseException, note: str = "") -> None:
    print_error("sdrun train", e, note)


# Hydra prints multi-line reports for composition errors; we want one line, so we ask it to
# raise and format the error ourselves. HYDRA_FULL_ERROR=1 from the user still shows the
# full traceback.
_USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"


def run_train(argv: list[str]) -> int:
    from sdrun.config import removed_key_error
    removed = removed_key_error(argv)
    if removed:  # bf16= and compile= from before `precision` and `speed`: say what replaced them
        print(f"sdrun train: error: {removed}", file=sys.stderr)
        return 2
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = ["sdrun train", *argv]

    # Under torchrun every process runs this; they join one process group before Hydra
    # composes the config, so rank 0 can share its run directory (sdrun/distributed.py).
    torchrun = launched_by_torchrun()
    if torchrun:
        distributed.init()
    try:
        return _run_train()
    finally:
        if torchrun:
            distributed.teardown()


def _run_train() -> int:
    from sdrun.launch.guard import GuardStop
    from sdrun.launch.runs import AlreadyFinished

    try:
        try:
            check_hydra_modes(sys.argv[1:])
            _hydra_train()
        except GuardStop as stop:  # raised before Hydra wrote anything into the run directory
            raise stop.error from None
    except AlreadyFinished as e:
        print(f"sdrun train: {e}", file=sys.stderr)
        return 0
    except _user_errors() as e:
        if _USER_FULL_ERROR:
            raise
        _print_error(e, sweep_note())
        return 2
    return 0


# Hydra runs one of these modes per call and raises a bare ValueError (a traceback) on two.
_MODES = {"-m": "-m/--multirun", "--multirun": "-m/--multirun", "-c": "--cfg", "--cfg": "--cfg",
          "-i": "--info", "--info": "--info", "-r": "--run", "--run": "--run", "-sc": "--shell-completion",
          "--shell-completion": "--shell-completion"}


def check_hydra_modes(argv: list[str]) -> None:
    from sdrun.config import ConfigError

    used = list(dict.fromkeys(_MODES[a.split("=")[0]] for a in argv if a.split("=")[0] in _MODES))
    if len(used) > 1:
        raise ConfigError(f"{' and '.join(used)} cannot be combined (Hydra does one of them per call); to see the "
                          "config of one job of a sweep (or its launcher settings), drop -m and give one value "
                          "per key, e.g. sdrun train pL=0.5 seed=1 --cfg job (or --cfg hydra)")


def sweep_note() -> str:
    """For a sweep that ended with failed jobs: how many, and where the summary is."""
    import json

    from sdrun.launch import guard

    if guard.LAST_SWEEP_SUMMARY is None or not guard.LAST_SWEEP_SUMMARY.is_file():
        return ""
    jobs = json.loads(guard.LAST_SWEEP_SUMMARY.read_text())["jobs"]
    failed = [f"job {j['num']} ({','.join(j['overrides'])})" for j in jobs if j["status"] == "failed"]
    if not failed:
        return ""
    return (f" [sweep: {len(failed)} of {len(jobs)} jobs failed: {'; '.join(failed)}; the others' results "
            f"are kept; see {guard.LAST_SWEEP_SUMMARY}]")


