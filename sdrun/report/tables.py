"""`sdrun table`: the paper's Tables 1 and 2 from the user's runs, beside the paper's figures.

Table 1: test error (%) at the epoch of lowest validation error (without a validation set,
ImageNet's default, the last epoch's, with fb.resnet.torch's best over epochs in a note and the
CSV), mean and sample std over
seeds, the paper's figure for the same setting and the difference; for each stochastic-depth
row with constant-depth runs of the same setting, the difference to them with Welch's 95 %
interval, p-value and verdict, and (under the table) the seeds per side that would detect the
paper's difference for that setting at 80 % power (sdrun.report.stats).
Table 2: training time (the training passes only; evaluation is excluded by the trainer),
per epoch so runs of different lengths compare, the measured ratio to the constant-depth
runs of the same setting with its 95 % interval, the ratio the expected depth predicts, and
the paper's ratio.

Rows are built once as plain numbers (the CSV holds them as they are) and formatted for
Markdown and LaTeX by tabulate.
"""

from __future__ import annotations

import csv
import io
import re
import statistics
import sys
from pathlib import Path

from tabulate import tabulate

from sdrun import paper
from sdrun.errors import ArgParser
from sdrun.report import stats
from sdrun.report.collect import Group, RunsError, cohorts, load_groups
from sdrun.rundir import HEADLINE
from sdrun.text import duration, model_label

TABLE1_FIELDS = ["dataset", "depth", "pL", "survival", "variant", "epochs", "n", "seeds",
                 "test_error_pct_mean", "test_error_pct_std", "paper_test_error_pct", "diff_vs_paper_pct",
                 "selection", "best_test_error_pct_mean", "best_test_error_pct_std",
                 "diff_vs_constant_pct", "diff_ci95_low_pct", "diff_ci95_high_pct", "welch_df", "p_value",
                 "verdict", "paper_diff_pct", "pooled_std_pct", "seeds_needed_80pct_power"]
TABLE2_FIELDS = ["dataset", "depth", "pL", "survival", "variant", "epochs", "n",
                 "train_time_per_epoch_s_mean", "train_time_per_epoch_s_std", "train_time_s_mean",
                 "measured_ratio", "ratio_ci95_low", "ratio_ci95_high", "expected_depth_ratio",
                 "paper_train_time_min", "paper_ratio"]

TABLE1_TITLE = "Table 1: test error (%) at the best-validation epoch"
TABLE1_NOTE = ("Mean ± sample std over n seeds. Paper: Huang et al. 2016, Table 1, shown only for the "
               "setting it was measured on (same dataset, depth and epochs; stochastic = linear decay to pL=0.5); "
               "diff = ours − paper, in points. vs constant: this row's mean − that of the constant-depth runs "
               "of the same setting, in points, with Welch's 95 % confidence interval and two-sided p-value "
               "(unequal variances); verdict: lower or higher when the interval excludes 0, else not "
               "distinguishable with these seeds; with one seed on a side there is no interval and no p-value.")
SEEDS_TITLE = ("Seeds needed: for the paper's difference of the setting, the seeds per side that would detect it "
               "with 80 % power given the spread observed here")
# results.json "selection" of a run without a validation set (ImageNet by default): the test error
# reported is the last epoch's, where fb.resnet.torch prints the lowest over the epochs.
LAST_EPOCH = "last_epoch"
SELECTION_TITLE = ("No validation set (ImageNet): the test error shown is the last epoch's top-1; fb.resnet.torch "
                   "prints the best over epochs (' * Finished top1', the lowest test top-1 of any epoch, so "
                   "selected on the test set)")
TABLE2_TITLE = "Table 2: training time (training passes only, evaluation excluded)"
TABLE2_NOTE = ("Ratio: time per epoch over that of the constant-depth runs of the same setting (ratio of the "
               "means). 95 % CI: Welch's interval on the log of the per-epoch times, exponentiated, so an interval "
               "for the ratio of the geometric means. "
               "Expected-depth ratio: expected active blocks / L, the residual compute predicted. "
               "Paper: Table 2, one TITAN X, total time.")


def _baselines(groups: list[Group]) -> dict[tuple, Group | None]:
    """Each cohort's constant-depth group (pL = 1; None when the runs have none)."""
    return {cohort: next((g for g in gs if g.survival is None), None) for cohort, gs in cohorts(groups).items()}


def table1_rows(groups: list[Group]) -> list[dict]:
    constant = _baselines(groups)
    rows = []
    for g in groups:
        mean = g.mean(HEADLINE)
        ref = paper.table1_error_pct(g.dataset, g.depth, g.epochs, g.pL, g.survival or "linear")
        rows.append({**_setting(g), "seeds": " ".join(str(r.seed) for r in sorted(g.runs, key=lambda r: r.seed)),
                     "test_error_pct_mean": mean, "test_error_pct_std": g.std(HEADLINE),
                     "paper_test_error_pct": ref, "diff_vs_paper_pct": None if ref is None else mean - ref,
                     **_best_over_epochs(g), **_vs_constant(g, constant[g.cohort])})
    return rows


def _best_over_epochs(g: Group) -> dict:
    """The group's selection and, for runs without a validation set only, the mean and std of their
    lowest test error over the epochs (results.json best_test_error_pct: fb.resnet.torch's number).
    None where a run lacks it (results.json written before the key) and for best-validation rows,
    where a minimum over the test set is no valid selection."""
    selection = g.selection()
    out = {"selection": selection, "best_test_error_pct_mean": None, "best_test_error_pct_std": None}
    values = g.optional_values("best_test_error_pct") if selection == LAST_EPOCH else None
    if values:
        out.update(best_test_error_pct_mean=statistics.fmean(values),
                   best_test_error_pct_std=statistics.stdev(values) if len(values) > 1 else None)
    return out


def selection_notes(rows: list[dict]) -> list[str]:
    """Under Table 1: for each row without a validation set, its last-epoch figure and the best over epochs."""
    notes = []
    for r in rows:
        if r["selection"] != LAST_EPOCH:
            continue
        head = (f"{r['dataset']} depth {r['depth']} {_model(r)}" + (f" ({r['variant']})" if r["variant"] else "")
                + f": last epoch {_format_mean_std(r['test_error_pct_mean'], r['test_error_pct_std'])}, ")
        if r["best_test_error_pct_mean"] is None:
            notes.append(head + "best over epochs not recorded (results.json without best_test_error_pct)")
        else:
            notes.append(head + "best over epochs "
                         + _format_mean_std(r["best_test_error_pct_mean"], r["best_test_error_pct_std"]))
    return notes


def _vs_constant(g: Group, base: Group | None) -> dict:
    """Table 1's comparison of a stochastic-depth group with its constant-depth baseline (all None
    for the baseline itself and for groups without one)."""
    out = dict.fromkeys(TABLE1_FIELDS[TABLE1_FIELDS.index("diff_vs_constant_pct"):])
    if base is None or g is base:
        return out
    sd, const = g.values(HEADLINE), base.values(HEADLINE)
    d = stats.welch(sd, const)
    out.update(diff_vs_constant_pct=d.diff, diff_ci95_low_pct=d.low, diff_ci95_high_pct=d.high, welch_df=d.df,
               p_value=d.p, verdict=d.verdict)
    ours = paper.table1_error_pct(g.dataset, g.depth, g.epochs, g.pL, g.survival or "linear")
    theirs = paper.table1_error_pct(g.dataset, g.depth, g.epochs, 1.0, "linear")
    if ours is not None and theirs is not None:
        spread = stats.pooled_std(sd, const)
        out.update(paper_diff_pct=ours - theirs, pooled_std_pct=spread,
                   seeds_needed_80pct_power=stats.seeds_needed(ours - theirs, spread))
    return out


def seeds_notes(rows: list[dict]) -> list[str]:
    """Under Table 1: for each row with the paper's difference, the seeds per side that would detect it."""
    notes = []
    for r in rows:
        if r["paper_diff_pct"] is None:
            continue
        head = (f"{r['dataset']} depth {r['depth']} {_model(r)}"
                + (f" ({r['variant']})" if r["variant"] else "")
                + f": the paper's difference to constant depth, {r['paper_diff_pct']:+.2f} points, ")
        needed, spread = r["seeds_needed_80pct_power"], r["pooled_std_pct"]
        if spread is None or spread == 0:
            notes.append(head + "needs >= 2 seeds per side to estimate (no spread between seeds to go on)")
        elif needed is None:
            notes.append(head + f"needs more than {stats.MAX_SEEDS:,} seeds per side for 80 % power "
                                f"at the observed spread (pooled sd {spread:.2f})")
        else:
            notes.append(head + f"needs {needed} seeds per side for 80 % power at the observed spread "
                                f"(pooled sd {spread:.2f}; two-sided t-test at 5 %)")
    return notes


def table2_rows(groups: list[Group]) -> list[dict]:
    constant = _baselines(groups)
    rows = []
    for g in groups:
        base = constant[g.cohort]
        per_epoch = g.mean("train_time_per_epoch_s")
        run = g.runs[0].results
        ratio_ref = paper.table2_time_ratio(g.dataset, g.depth, g.epochs)
        ci = None if base is None or base is g else stats.ratio_interval(g.values("train_time_per_epoch_s"),
                                                                         base.values("train_time_per_epoch_s"))
        rows.append({**_setting(g),
                     "train_time_per_epoch_s_mean": per_epoch,
                     "train_time_per_epoch_s_std": g.std("train_time_per_epoch_s"),
                     "train_time_s_mean": g.mean("train_time_s"),
                     "measured_ratio": None if base is None else per_epoch / base.mean("train_time_per_epoch_s"),
                     "ratio_ci95_low": None if ci is None else ci[0],
                     "ratio_ci95_high": None if ci is None else ci[1],
                     "expected_depth_ratio": run["expected_active_blocks"] / run["num_blocks"],
                     "paper_train_time_min": paper.table2_time_min(g.dataset, g.depth, g.epochs, g.pL,
                                                                   g.survival or "linear"),
                     "paper_ratio": _paper_ratio(g, ratio_ref),
                     "_ratio_no_interval": base is not None and base is not g and min(g.n, base.n) < 2})
    return rows


def _paper_ratio(g: Group, ratio: float | None) -> float | None:
    method = paper.method(g.pL, g.survival or "linear")
    if ratio is None or method is None:
        return None
    return 1.0 if method == "constant" else ratio


def _setting(g: Group) -> dict:
    return {"dataset": g.dataset, "depth": g.depth, "pL": g.pL, "survival": g.survival or "",
            "variant": g.variant, "epochs": g.epochs, "n": g.n}


# ---- formatting: numbers to strings, then tabulate aligns them

def _num(x: float | None, digits: int = 2) -> str | None:
    return None if x is None else f"{x:.{digits}f}"


def _format_mean_std(mean: float, std: float | None, digits: int = 2) -> str:
    return _num(mean, digits) if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _signed(x: float | None) -> str | None:
    return None if x is None else f"{x:+.2f}"


def _hours(seconds: float | None) -> str | None:
    """A training time as the paper's Table 2 writes it ('20h 42m'); None for none (tabulate's '–')."""
    return None if seconds is None else duration(seconds, days=False)


def _model(row: dict) -> str:
    return model_label(row["pL"], row["survival"] or None)


def _p(p: float | None) -> str | None:
    return None if p is None else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _interval(low: float | None, high: float | None, digits: int = 2, signed: bool = True) -> str | None:
    f = f"+.{digits}f" if signed else f".{digits}f"
    return None if low is None else f"[{low:{f}}, {high:{f}}]"


def _ci_cell(r: dict) -> str | None:
    """Table 1's interval: the interval, or why there is none (one seed, no spread); None off the comparison."""
    if r["diff_vs_constant_pct"] is None:
        return None
    return _interval(r["diff_ci95_low_pct"], r["diff_ci95_high_pct"]) or r["verdict"]


def table1_display(rows: list[dict]) -> tuple[list[str], list[list]]:
    headers = ["dataset", "depth", "model", "epochs", "n", "test error (%)", "paper (%)", "diff",
               "vs constant", "95% CI", "p", "verdict"]
    body = [[r["dataset"], str(r["depth"]), _model(r), str(r["epochs"]), str(r["n"]),
             _format_mean_std(r["test_error_pct_mean"], r["test_error_pct_std"]),
             _num(r["paper_test_error_pct"]), _signed(r["diff_vs_paper_pct"]),
             _signed(r["diff_vs_constant_pct"]), _ci_cell(r), _p(r["p_value"]),
             r["verdict"] if r["p_value"] is not None else None] for r in rows]
    return _with_variant(headers, body, rows)


def _ratio_ci_cell(r: dict) -> str | None:
    if r["measured_ratio"] is None or r["pL"] == 1.0:
        return None
    if r["ratio_ci95_low"] is None:
        return stats.NO_INTERVAL if r.get("_ratio_no_interval") else "no spread: no interval"
    return _interval(r["ratio_ci95_low"], r["ratio_ci95_high"], signed=False)


def table2_display(rows: list[dict]) -> tuple[list[str], list[list]]:
    headers = ["dataset", "depth", "model", "epochs", "n", "s / epoch", "training time", "ratio", "ratio 95% CI",
               "expected-depth ratio", "paper time", "paper ratio"]
    body = [[r["dataset"], str(r["depth"]), _model(r), str(r["epochs"]), str(r["n"]),
             _format_mean_std(r["train_time_per_epoch_s_mean"], r["train_time_per_epoch_s_std"], 3),
             _hours(r["train_time_s_mean"]), _num(r["measured_ratio"]), _ratio_ci_cell(r),
             _num(r["expected_depth_ratio"]),
             _hours(None if r["paper_train_time_min"] is None else 60 * r["paper_train_time_min"]),
             _num(r["paper_ratio"])] for r in rows]
    return _with_variant(headers, body, rows)


def _with_variant(headers: list[str], body: list[list], rows: list[dict]) -> tuple[list[str], list[list]]:
    """A 'differs in' column, only when some rows of one dataset and depth had different recipes."""
    if any(r["variant"] for r in rows):
        headers = headers[:3] + ["differs in"] + headers[3:]
        body = [line[:3] + [r["variant"]] + line[3:] for line, r in zip(body, rows)]
    return headers, body


def render(headers: list[str], body: list[list], fmt: str) -> str:
    # Text columns left, numbers right; numbers are already formatted, so no re-parsing.
    align = ["left" if h in ("dataset", "model", "differs in", "verdict") else "right" for h in headers]
    return tabulate(body, headers=headers, tablefmt=fmt, colalign=align, disable_numparse=True, missingval="–")


def markdown(t1: list[dict], t2: list[dict], notes: list[str]) -> str:
    parts = [f"## {TABLE1_TITLE}\n", render(*table1_display(t1), "github"), f"\n{TABLE1_NOTE}\n"]
    needed = seeds_notes(t1)
    if needed:
        parts += [f"{SEEDS_TITLE}:\n", *[f"- {n}" for n in needed], ""]
    last_epoch = selection_notes(t1)
    if last_epoch:
        parts += [f"{SELECTION_TITLE}:\n", *[f"- {n}" for n in last_epoch], ""]
    parts += [f"## {TABLE2_TITLE}\n", render(*table2_display(t2), "github"), f"\n{TABLE2_NOTE}\n"]
    if notes:
        parts += ["Not averaged together:\n", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts)


def latex_notes(notes: list[str], title: str = SEEDS_TITLE) -> str:
    """Notes (by default the seeds-needed ones) as text under the tabular (escaped for LaTeX); '' without any."""
    if not notes:
        return ""
    swaps = {"\\": r"\textbackslash{}", "%": r"\%", "_": r"\_", "&": r"\&", "#": r"\#", "$": r"\$",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
             ">=": r"$\geq$", "−": "$-$", "±": r"$\pm$"}
    special = re.compile("|".join(re.escape(k) for k in sorted(swaps, key=len, reverse=True)))

    def tex(text: str) -> str:  # one pass, so a replacement is never escaped again
        return special.sub(lambda m: swaps[m.group(0)], text)
    return "\n".join([f"\\par\\smallskip\\footnotesize {tex(title)}:",
                      *[f"\\par {tex(n)}" for n in notes]]) + "\n"


def csv_text(fields: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    # extrasaction: rows may carry display-only keys ('_...'), never written
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_outputs(out: Path, t1: list[dict], t2: list[dict], md: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "tables.md": md,
        "table1.tex": render(*table1_display(t1), "latex_booktabs") + "\n" + latex_notes(seeds_notes(t1))
        + latex_notes(selection_notes(t1), SELECTION_TITLE),
        "table2.tex": render(*table2_display(t2), "latex_booktabs") + "\n",
        "table1.csv": csv_text(TABLE1_FIELDS, t1),
        "table2.csv": csv_text(TABLE2_FIELDS, t2),
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / n for n in ("tables.md", "table1.csv", "table1.tex", "table2.csv", "table2.tex")]


def main(argv: list[str]) -> int:
    parser = ArgParser(prog="sdrun table", description=(
        "Tables 1 and 2 of the paper from finished runs below the given directories (single runs "
        "and multirun sweeps), seeds averaged, beside the paper's figures. Markdown on stdout."))
    parser.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument("--out", type=Path, help="also write table{1,2}.csv, table{1,2}.tex (booktabs) and tables.md here")
    args = parser.parse_args(argv)

    try:
        groups, notes = load_groups(args.dirs)
    except RunsError as e:
        return parser.fail(str(e), code=e.exit_code)
    t1, t2 = table1_rows(groups), table2_rows(groups)
    md = markdown(t1, t2, notes)
    print(md)
    if args.out:
        for path in write_outputs(args.out, t1, t2, md):
            print(f"wrote {path}", file=sys.stderr)
    return 0
