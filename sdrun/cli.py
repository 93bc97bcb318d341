"""The `sdrun` console script: dispatch to each subcommand's own main(argv), which returns the
exit code and prints one-line errors itself.

`sdrun train ...` hands the rest of the command line to the Hydra app (sdrun.launch.app)
unchanged, so overrides, `-m` multirun, `--cfg job`, `--help` and `hydra.run.dir=...` all work
as in any Hydra app. Every subcommand's module is imported only when it runs, so `sdrun status`
never imports torch.
"""

from __future__ import annotations

import gc
import sys

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


# Each subcommand's module is imported inside its runner, only when it runs: `sdrun status`
# never pays for torch, nor `sdrun train` for matplotlib.

def run_table(argv: list[str]) -> int:
    from sdrun.report.tables import main
    return main(argv)


def run_plot(argv: list[str]) -> int:
    from sdrun.report.figures import main
    return main(argv)


def run_analyze(argv: list[str]) -> int:
    from sdrun.tools.analyze import main as analyze_main
    return analyze_main(argv)


def run_bench(argv: list[str]) -> int:
    from sdrun.tools.bench import run_bench
    return run_bench(argv)


def run_report(argv: list[str]) -> int:
    from sdrun.report.page import main
    return main(argv)


def run_status(argv: list[str]) -> int:
    from sdrun.report.status import main  # imports no torch: it must answer in about a second on a login node
    return main(argv)


def run_train(argv: list[str]) -> int:
    from sdrun.launch.app import main  # the Hydra app
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
