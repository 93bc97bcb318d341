"""The `sdrun` console script: subcommands, and one-line errors instead of tracebacks.

`sdrun train ...` hands the rest of the command line to Hydra unchanged, so overrides,
`-m` multirun, `--cfg job`, `--help` and `hydra.run.dir=...` all work as in any Hydra app.
"""

from __future__ import annotations

import gc
import os
import sys

from sdrun.errors import UserError, print_error

USAGE = """usage: sdrun <command> [args]

Reproduce "Deep Networks with Stochastic Depth" (Huang et al., ECCV 2016).

commands:
  train     train a ResNet with stochastic depth (Hydra app: sdrun train --help)
  table     Tables 1 and 2 from finished runs, beside the paper's figures
  plot      Figs. 3, 4, 7 and 8 from finished runs (PNG and PDF)
  status    where every run and sweep below DIR... stands: state, epoch, errors, ETA (no torch)
  report    one shareable page: REPORT.md with tables, figures, analyses and what was run
  analyze   test the implicit-ensemble claim on a trained run (sdrun analyze --help)
  bench     measure the stochastic-depth saving, trainer overhead, eval speed (sdrun bench --help)

examples:
  sdrun train                              # the offline digits demo
  sdrun train dataset=cifar10 pL=0.5       # the paper's CIFAR-10 run (ResNet-110, 500 epochs)
  sdrun train -m dataset=cifar10 pL=0.1,0.2,0.5,1.0
  sdrun train -m experiment=table1_cifar10  # a paper experiment (conf/experiment/)
  sdrun train dataset=cifar10 fidelity=paper  # the paper's text instead of its reference code (conf/fidelity/)
  sdrun table multirun/ runs/ --out tables/
  sdrun plot multirun/ --out figures/
  sdrun status multirun/ runs/ --watch 60
  sdrun analyze runs/SD_RUN --compare runs/CONSTANT_RUN
"""


def _hydra_train() -> None:
    import hydra

    from sdrun.config import register_configs
    from sdrun.launchers import register_resolvers

    register_configs()
    register_resolvers()  # ${local_jobs:} in the hydra/launcher=parallel preset

    @hydra.main(version_base="1.3", config_path="pkg://sdrun.conf", config_name="train")
    def app(cfg) -> float | None:
        from hydra.core.hydra_config import HydraConfig

        from sdrun.launchers import job_resources
        from sdrun.results import HEADLINE
        from sdrun.guard import undo_failed_start
        from sdrun.runs import AlreadyFinished
        from sdrun.train import Interrupted, train

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
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # as distributed.py
    if torchrun:
        from sdrun import distributed
        distributed.init()
    try:
        return _run_train()
    finally:
        if torchrun:
            distributed.teardown()


def _run_train() -> int:
    from sdrun.guard import GuardStop
    from sdrun.runs import AlreadyFinished

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

    from sdrun import guard

    if guard.LAST_SWEEP_SUMMARY is None or not guard.LAST_SWEEP_SUMMARY.is_file():
        return ""
    jobs = json.loads(guard.LAST_SWEEP_SUMMARY.read_text())["jobs"]
    failed = [f"job {j['num']} ({','.join(j['overrides'])})" for j in jobs if j["status"] == "failed"]
    if not failed:
        return ""
    return (f" [sweep: {len(failed)} of {len(jobs)} jobs failed: {'; '.join(failed)}; the others' results "
            f"are kept; see {guard.LAST_SWEEP_SUMMARY}]")


def run_table(argv: list[str]) -> int:
    from sdrun.report import main
    return main(argv)


def run_plot(argv: list[str]) -> int:
    from sdrun.plots import main
    return main(argv)


def run_analyze(argv: list[str]) -> int:
    from sdrun.analyze import main as analyze_main
    return analyze_main(argv)


def run_bench(argv: list[str]) -> int:
    from sdrun.bench import run_bench
    return run_bench(argv)


def run_report(argv: list[str]) -> int:
    from sdrun.report_page import main
    return main(argv)


def run_status(argv: list[str]) -> int:
    from sdrun.status import main  # imports no torch: it must answer in about a second on a login node
    return main(argv)


COMMANDS = {"train": run_train, "table": run_table, "plot": run_plot, "analyze": run_analyze,
            "bench": run_bench, "status": run_status, "report": run_report}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sdrun: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[command](rest))


def console_script() -> None:
    """`sdrun` as installed ([project.scripts]) and `python -m sdrun`: main(), then a quick exit.

    The interpreter's last garbage collection walks every object of the thousands of modules
    torch imports: 1 to 1.5 s at the end of every command on a 2-core machine. Freezing them
    first skips it. Nothing is lost: every file sdrun writes is closed before main() returns.
    (main() itself, called in-process by tests, leaves the collector alone.)
    """
    try:
        main()
    finally:
        gc.freeze()
