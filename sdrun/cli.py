"""The `sdrun` console script: subcommands, and one-line errors instead of tracebacks.

`sdrun train ...` hands the rest of the command line to Hydra unchanged, so overrides,
`-m` multirun, `--cfg job`, `--help` and `hydra.run.dir=...` all work as in any Hydra app.
"""

from __future__ import annotations

import argparse
import os
import sys

USAGE = """usage: sdrun <command> [args]

Reproduce "Deep Networks with Stochastic Depth" (Huang et al., ECCV 2016).

commands:
  train     train a ResNet with stochastic depth (Hydra app: sdrun train --help)
  table     Tables 1 and 2 from finished runs, beside the paper's figures
  plot      Figs. 3, 7 and 8 from finished runs (PNG and PDF)
  analyze   test the implicit-ensemble claim on a trained run (sdrun analyze --help)
  bench     measure the stochastic-depth saving, trainer overhead, eval speed (sdrun bench --help)

examples:
  sdrun train                              # the offline digits demo
  sdrun train dataset=cifar10 pL=0.5       # the paper's CIFAR-10 run (ResNet-110, 500 epochs)
  sdrun train -m dataset=cifar10 pL=0.1,0.2,0.5,1.0
  sdrun train -m experiment=table1_cifar10  # a paper experiment (conf/experiment/)
  sdrun table multirun/ runs/ --out tables/
  sdrun plot multirun/ --out figures/
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
            # In a sweep, raise: Hydra finishes the other jobs, then reports which one failed.
            if multirun or _USER_FULL_ERROR:
                raise
            _print_error(e)
            raise SystemExit(2) from None
        return results["test_error_at_best_val_pct"]

    app()


_NOISE = ("full_key:", "object_type=", "reference_type=", "provider=", "Config search path")


def one_line(exc: BaseException) -> str:
    """An exception's message (and its cause's) folded onto one line, without Hydra's
    search-path dump or OmegaConf's key/type trailer."""
    parts = []
    for e in (exc, exc.__cause__):
        if e is None:
            continue
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        parts += [line for line in lines if not line.startswith(_NOISE)]
    return " ".join(parts) or type(exc).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sdrun.config import ConfigError
    from sdrun.data import DataError
    from sdrun.io import OutputError
    from sdrun.runs import CheckpointError
    return (ConfigError, DataError, CheckpointError, OutputError, HydraException, OmegaConfBaseException,
            FloatingPointError)


def _print_error(e: BaseException, note: str = "") -> None:
    print(f"sdrun train: error: {one_line(e)}{note}", file=sys.stderr)


# Hydra prints multi-line reports for composition errors; we want one line, so we ask it to
# raise and format the error ourselves. HYDRA_FULL_ERROR=1 from the user still shows the
# full traceback.
_USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"


def run_train(argv: list[str]) -> int:
    from sdrun.speed import legacy_override
    if legacy_override(argv):  # the removed compile= setting: say what replaced it
        print(f"sdrun train: error: {legacy_override(argv)}", file=sys.stderr)
        return 2
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = ["sdrun train", *argv]

    # Under torchrun every process runs this; they join one process group before Hydra
    # composes the config, so rank 0 can share its run directory (sdrun/distributed.py).
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torchrun:
        from sdrun import distributed
        distributed.init()
    try:
        return _run_train()
    finally:
        if torchrun:
            distributed.teardown()


def _run_train() -> int:
    from sdrun.runs import AlreadyFinished, GuardStop

    try:
        try:
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


def sweep_note() -> str:
    """For a sweep that ended with failed jobs: how many, and where the summary is."""
    import json

    from sdrun import runs

    if runs.LAST_SWEEP_SUMMARY is None or not runs.LAST_SWEEP_SUMMARY.is_file():
        return ""
    jobs = json.loads(runs.LAST_SWEEP_SUMMARY.read_text())["jobs"]
    failed = [f"job {j['num']} ({','.join(j['overrides'])})" for j in jobs if j["status"] == "failed"]
    if not failed:
        return ""
    return (f" [sweep: {len(failed)} of {len(jobs)} jobs failed: {'; '.join(failed)}; the others' results "
            f"are kept; see {runs.LAST_SWEEP_SUMMARY}]")



class ArgParser(argparse.ArgumentParser):
    """argparse for the non-Hydra subcommands, with its usage errors on one line."""

    def fail(self, message: str, code: int = 2) -> int:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        return code

    def error(self, message: str):
        sys.exit(self.fail(message))


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


COMMANDS = {"train": run_train, "table": run_table, "plot": run_plot, "analyze": run_analyze,
            "bench": run_bench}


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
