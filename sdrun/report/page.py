"""`sdrun report DIR... --out DIR`: one page to hand to a colleague (REPORT.md, PNGs beside it).

Nothing here computes a number of its own: the tables are `sdrun table`'s (sdrun.report.tables), the
figures `sdrun plot`'s (sdrun.report.figures), the ensemble analyses the files `sdrun analyze` wrote
(analysis/report.txt and its PNGs, found below the directories). Around them: what was run
(settings, seeds, device and GPU, precision, software versions, total time), and every table,
figure or analysis the runs cannot support, with its one-line reason.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from sdrun.errors import ArgParser
from sdrun.report.collect import FinishedRun, NoRuns, RunsError, find_runs, group_runs
from sdrun.report.figures import make_figures, safe_stem
from sdrun.report.tables import markdown, table1_rows, table2_rows, write_outputs
from sdrun.text import duration, model_label

VERSION_KEYS = ("sdrun", "python", "torch", "torchvision", "hydra", "omegaconf", "cuda", "platform")


def _counts(values) -> str:
    """'cpu (3), cuda:0 (2)': each distinct value with how many runs have it."""
    c = Counter(str(v) for v in values)
    return ", ".join(f"{v} ({n})" if len(c) > 1 else v for v, n in sorted(c.items()))


def _gpu(results: dict) -> str | None:
    """The GPU's name: results.json's `hardware` (sdrun.engine.runtime.device_info) on CUDA runs."""
    hardware = results.get("hardware") or {}
    return hardware.get("name") if hardware.get("type") == "cuda" else None


def _setting(results: dict) -> str:
    return f"{results['dataset']} depth {results['depth']}"


def _wall_s(run: FinishedRun) -> float | None:
    """The run's wall time over all its attempts: the last epoch's elapsed_s (sdrun.engine.clock) when the
    trainer logged it, plus the final write; else the last attempt's wall_time_s."""
    records = run.metrics()
    if records and records[-1].get("elapsed_s") is not None:
        return max(records[-1]["elapsed_s"], run.results.get("wall_time_s") or 0.0)
    return run.results.get("wall_time_s")


def _hours(seconds: float) -> str:
    return duration(seconds, days=False)  # GPU time is budgeted in hours, as Table 2 writes it


def what_was_run(runs: list[FinishedRun], skipped: list, dirs: list[str]) -> list[str]:
    r = [run.results for run in runs]
    on_gpu = [run for run in runs if str(run.results.get("device", "")).startswith("cuda")]
    walls = [_wall_s(run) for run in runs]
    gpu_walls = [_wall_s(run) for run in on_gpu]
    lines = [
        "## What was run\n",
        f"- **Runs**: {len(runs)} finished below {', '.join(f'`{d}`' for d in dirs)}"
        + (f"; {len(skipped)} not counted (listed under *Not shown*)" if skipped else ""),
        f"- **Datasets and depths**: {_counts(_setting(x) for x in r)}",
        f"- **Models**: {_counts(model_label(x['pL'], x['survival']) for x in r)}",
        f"- **Seeds**: {' '.join(str(s) for s in sorted({x['seed'] for x in r}))}",
        f"- **Epochs**: {_counts(x['epochs'] for x in r)}",
        f"- **Device**: {_counts(x.get('device', '?') for x in r)}"
        + (f"; GPU: {_counts(_gpu(x) for x in r if _gpu(x))}" if any(_gpu(x) for x in r) else ""),
        f"- **Precision**: {_counts(x['precision'] for x in r)}",
        f"- **Training time** (training passes only, all runs): {_hours(sum(x['train_time_s'] for x in r))}",
    ]
    if None not in walls:
        lines.append(f"- **Wall time** (all runs, evaluation included): {_hours(sum(walls))}"
                     + (f"; on GPUs: {_hours(sum(gpu_walls))} GPU time" if on_gpu else ""))
    versions = [x.get("versions") or {} for x in r]
    lines.append("- **Software**: " + "; ".join(
        f"{k} {_counts(v.get(k) for v in versions)}" for k in VERSION_KEYS if any(v.get(k) for v in versions)))
    return lines + [""]


def find_analyses(dirs: list[str]) -> list[Path]:
    """Directories holding `sdrun analyze` output (analysis.json), below the given directories."""
    found = []
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            if "analysis.json" in filenames:
                found.append(Path(dirpath))
    return sorted(set(found))


def analyses_section(found: list[Path], out: Path) -> list[str]:
    lines = ["## Is it an implicit ensemble? (`sdrun analyze`)\n"]
    for i, d in enumerate(found, start=1):
        try:
            runs = json.loads((d / "analysis.json").read_text()).get("runs", [])
        except (OSError, ValueError, AttributeError):
            runs = []
        lines.append(f"### {d}\n")
        if (d / "report.txt").is_file():
            lines += ["```", (d / "report.txt").read_text().rstrip(), "```", ""]
        elif runs:
            lines += ["```", json.dumps(runs, indent=1)[:4000], "```", ""]
        for png in sorted(d.glob("*.png")):
            name = f"analysis{i}_{png.name}"
            shutil.copyfile(png, out / name)
            lines += [f"![{png.stem}]({name})", ""]
    return lines


def build(dirs: list[str], out: Path, command: list[str]) -> tuple[Path, list[Path]]:
    runs, skipped = find_runs(dirs)
    if not runs:
        raise NoRuns(f"no finished runs below {', '.join(dirs)} ({len(skipped)} skipped)")
    groups, notes = group_runs(runs)
    t1, t2 = table1_rows(groups), table2_rows(groups)
    out.mkdir(parents=True, exist_ok=True)
    written = write_outputs(out / "tables", t1, t2, markdown(t1, t2, notes))

    figures, not_drawn = make_figures(groups)
    figure_lines = ["## Figures (`sdrun plot`)\n"]
    for stem, fig in figures.items():
        path = out / f"{safe_stem(stem)}.png"
        fig.savefig(path, dpi=120)
        written.append(path)
        figure_lines += [f"![{stem}]({path.name})", ""]
    if not figures:
        figure_lines += ["None of the paper's figures can be drawn from these runs (reasons below).", ""]

    found = find_analyses(dirs)
    missing = list(not_drawn)
    if not found:
        missing.append("`sdrun analyze` results: none below the directories (run `sdrun analyze RUN_DIR "
                       "--compare CONSTANT_RUN_DIR` on a run trained with checkpoint=true)")
    missing += [f"run `{s.path}`: {s.reason}" for s in skipped]

    lines = ["# Stochastic depth: results\n",
             f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} by `{' '.join(command)}`. "
             "Errors in percent; the paper is Huang et al., *Deep Networks with Stochastic Depth*, ECCV 2016.\n",
             *what_was_run(runs, skipped, dirs),
             markdown(t1, t2, notes),
             *figure_lines]
    if found:
        lines += analyses_section(found, out)
    lines += ["## Not shown\n", *([f"- {m}" for m in missing] or ["- nothing: every table and figure is above"]), ""]
    page = out / "REPORT.md"
    page.write_text("\n".join(lines), encoding="utf-8")
    return page, written + sorted(out.glob("analysis*_*.png"))


def main(argv: list[str]) -> int:
    parser = ArgParser(prog="sdrun report", description=(
        "One shareable page from the runs below the directories: REPORT.md in --out with Tables 1 and 2, "
        "every figure the runs support (PNG beside it), `sdrun analyze` results, and what was run."))
    parser.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument("--out", type=Path, required=True, help="directory for REPORT.md and its figures")
    args = parser.parse_args(argv)
    try:
        page, files = build(args.dirs, args.out, ["sdrun", "report", *argv])
    except RunsError as e:
        return parser.fail(str(e), code=e.exit_code)
    for path in files:
        print(f"wrote {path}", file=sys.stderr)
    print(page)
    return 0
