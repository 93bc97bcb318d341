"""`sdrun table`: the paper's Tables 1 and 2 from the user's runs, beside the paper's figures.

Table 1: test error (%) at the epoch of lowest validation error, mean and sample std over
seeds, the paper's figure for the same setting and the difference.
Table 2: training time (the training passes only; evaluation is excluded by the trainer),
per epoch so runs of different lengths compare, the measured ratio to the constant-depth
runs of the same setting, the ratio the expected depth predicts, and the paper's ratio.

Rows are built once as plain numbers (the CSV holds them as they are) and formatted for
Markdown and LaTeX by tabulate.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from tabulate import tabulate

from sdrun import paper
from sdrun.errors import ArgParser
from sdrun.report.collect import Group, RunsError, cohorts, load_groups
from sdrun.rundir import HEADLINE
from sdrun.text import duration, model_label

TABLE1_FIELDS = ["dataset", "depth", "pL", "survival", "variant", "epochs", "n", "seeds",
                 "test_error_pct_mean", "test_error_pct_std", "paper_test_error_pct", "diff_vs_paper_pct"]
TABLE2_FIELDS = ["dataset", "depth", "pL", "survival", "variant", "epochs", "n",
                 "train_time_per_epoch_s_mean", "train_time_per_epoch_s_std", "train_time_s_mean",
                 "measured_ratio", "expected_depth_ratio", "paper_train_time_min", "paper_ratio"]

TABLE1_TITLE = "Table 1: test error (%) at the best-validation epoch"
TABLE1_NOTE = ("Mean ± sample std over n seeds. Paper: Huang et al. 2016, Table 1, shown only for the "
               "setting it was measured on (same dataset, depth and epochs; stochastic = linear decay to pL=0.5); "
               "diff = ours − paper, in points.")
TABLE2_TITLE = "Table 2: training time (training passes only, evaluation excluded)"
TABLE2_NOTE = ("Ratio: time per epoch over that of the constant-depth runs of the same setting. "
               "Expected-depth ratio: expected active blocks / L, the residual compute predicted. "
               "Paper: Table 2, one TITAN X, total time.")


def table1_rows(groups: list[Group]) -> list[dict]:
    rows = []
    for g in groups:
        mean = g.mean(HEADLINE)
        ref = paper.table1_error_pct(g.dataset, g.depth, g.epochs, g.pL, g.survival or "linear")
        rows.append({**_setting(g), "seeds": " ".join(str(r.seed) for r in sorted(g.runs, key=lambda r: r.seed)),
                     "test_error_pct_mean": mean, "test_error_pct_std": g.std(HEADLINE),
                     "paper_test_error_pct": ref, "diff_vs_paper_pct": None if ref is None else mean - ref})
    return rows


def table2_rows(groups: list[Group]) -> list[dict]:
    constant = {cohort: next((g for g in gs if g.survival is None), None) for cohort, gs in cohorts(groups).items()}
    rows = []
    for g in groups:
        base = constant[g.cohort]
        per_epoch = g.mean("train_time_per_epoch_s")
        run = g.runs[0].results
        ratio_ref = paper.table2_time_ratio(g.dataset, g.depth, g.epochs)
        rows.append({**_setting(g),
                     "train_time_per_epoch_s_mean": per_epoch,
                     "train_time_per_epoch_s_std": g.std("train_time_per_epoch_s"),
                     "train_time_s_mean": g.mean("train_time_s"),
                     "measured_ratio": None if base is None else per_epoch / base.mean("train_time_per_epoch_s"),
                     "expected_depth_ratio": run["expected_active_blocks"] / run["num_blocks"],
                     "paper_train_time_min": paper.table2_time_min(g.dataset, g.depth, g.epochs, g.pL,
                                                                   g.survival or "linear"),
                     "paper_ratio": _paper_ratio(g, ratio_ref)})
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


def table1_display(rows: list[dict]) -> tuple[list[str], list[list]]:
    headers = ["dataset", "depth", "model", "epochs", "n", "test error (%)", "paper (%)", "diff"]
    body = [[r["dataset"], str(r["depth"]), _model(r), str(r["epochs"]), str(r["n"]),
             _format_mean_std(r["test_error_pct_mean"], r["test_error_pct_std"]),
             _num(r["paper_test_error_pct"]), _signed(r["diff_vs_paper_pct"])] for r in rows]
    return _with_variant(headers, body, rows)


def table2_display(rows: list[dict]) -> tuple[list[str], list[list]]:
    headers = ["dataset", "depth", "model", "epochs", "n", "s / epoch", "training time", "ratio",
               "expected-depth ratio", "paper time", "paper ratio"]
    body = [[r["dataset"], str(r["depth"]), _model(r), str(r["epochs"]), str(r["n"]),
             _format_mean_std(r["train_time_per_epoch_s_mean"], r["train_time_per_epoch_s_std"], 3),
             _hours(r["train_time_s_mean"]), _num(r["measured_ratio"]), _num(r["expected_depth_ratio"]),
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
    align = ["left" if h in ("dataset", "model", "differs in") else "right" for h in headers]
    return tabulate(body, headers=headers, tablefmt=fmt, colalign=align, disable_numparse=True, missingval="–")


def markdown(t1: list[dict], t2: list[dict], notes: list[str]) -> str:
    parts = [f"## {TABLE1_TITLE}\n", render(*table1_display(t1), "github"), f"\n{TABLE1_NOTE}\n",
             f"## {TABLE2_TITLE}\n", render(*table2_display(t2), "github"), f"\n{TABLE2_NOTE}\n"]
    if notes:
        parts += ["Not averaged together:\n", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts)


def csv_text(fields: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_outputs(out: Path, t1: list[dict], t2: list[dict], md: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "tables.md": md,
        "table1.tex": render(*table1_display(t1), "latex_booktabs") + "\n",
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
