"""sdrun table and sdrun plot through the console script, on real runs of the smoke preset;
their bad-input cases through the same main() in process."""

import csv
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_sdrun, sdrun_main, train_in_process


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> Path:
    """A real multirun sweep (constant vs stochastic, seeds 1-2; through the CLI's main() in this
    process), one single run beside it (seed 3, trained in process), and one run directory that
    never finished."""
    root = tmp_path_factory.mktemp("smoke")
    r = sdrun_main("train", "-m", "experiment=smoke", "hydra.sweep.dir=sweep", cwd=root)
    assert r.returncode == 0, r.stderr
    train_in_process(root / "runs" / "single", "experiment=smoke", "pL=0.5", "seed=3")
    (root / "runs" / "killed" / ".hydra").mkdir(parents=True)
    return root


def results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("**/results.json"))]


def test_table_from_a_sweep_and_a_single_run(smoke_runs, tmp_path):
    r = run_sdrun("table", str(smoke_runs / "sweep"), str(smoke_runs / "runs"), "--out", str(tmp_path / "t"),
                  cwd=smoke_runs)
    assert r.returncode == 0, r.stderr
    assert f"skipped {smoke_runs / 'runs' / 'killed'}: unfinished: no results.json" in r.stderr
    assert "Traceback" not in r.stderr
    md = r.stdout
    assert md.startswith("## Table 1: test error (%) at the best-validation epoch")
    assert "## Table 2: training time" in md

    runs = results(smoke_runs)
    assert len(runs) == 5
    stochastic = [x["test_error_at_best_val_pct"] for x in runs if x["pL"] == 0.5]
    constant = [x["test_error_at_best_val_pct"] for x in runs if x["pL"] == 1.0]
    line = next(x for x in md.splitlines() if "stochastic linear pL=0.5" in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:5] == ["digits", "8", "stochastic linear pL=0.5", "3", "3"]
    assert cells[5] == f"{statistics.fmean(stochastic):.2f} ± {statistics.stdev(stochastic):.2f}"
    assert cells[6:8] == ["–", "–"]  # no paper figure for digits
    assert f"{statistics.fmean(constant):.2f} ± {statistics.stdev(constant):.2f}" in md
    # Against the constant-depth runs (3 seeds against 2): difference, Welch's interval, p, verdict.
    assert float(cells[8]) == pytest.approx(statistics.fmean(stochastic) - statistics.fmean(constant), abs=0.006)
    low, high = map(float, re.fullmatch(r"\[([-+]\d+\.\d\d), ([-+]\d+\.\d\d)\]", cells[9]).groups())
    assert low <= float(cells[8]) <= high
    assert 0 <= float(cells[10]) <= 1
    assert cells[11] in ("lower", "higher", "not distinguishable with these seeds")
    with open(tmp_path / "t" / "table1.csv", newline="") as f:
        sd_row = next(x for x in csv.DictReader(f) if x["pL"] == "0.5")
    for key in ("diff_vs_constant_pct", "diff_ci95_low_pct", "diff_ci95_high_pct", "welch_df", "p_value"):
        assert math.isfinite(float(sd_row[key])), key
    assert sd_row["seeds_needed_80pct_power"] == ""  # the paper has no digits figure

    table2 = (tmp_path / "t" / "table2.csv").read_text().splitlines()
    assert table2[0].startswith("dataset,depth,pL,survival,variant,epochs,n,train_time_per_epoch_s_mean")
    assert len(table2) == 3
    sd_times = next(x for x in csv.DictReader(table2) if x["pL"] == "0.5")
    low, high = float(sd_times["ratio_ci95_low"]), float(sd_times["ratio_ci95_high"])
    assert 0 < low <= high and math.isfinite(high)
    assert (tmp_path / "t" / "tables.md").read_text().strip() == md.strip()
    assert "\\toprule" in (tmp_path / "t" / "table1.tex").read_text()


def test_table_with_one_seed_a_side_gives_no_interval(smoke_runs, tmp_path):
    """One stochastic and one constant-depth run of the smoke sweep: a difference but no interval, no p-value."""
    by_pL = {}
    for path in sorted((smoke_runs / "sweep").glob("*/results.json")):
        by_pL.setdefault(json.loads(path.read_text())["pL"], path.parent)
    r = sdrun_main("table", str(by_pL[0.5]), str(by_pL[1.0]), "--out", str(tmp_path / "t"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "stochastic linear pL=0.5" in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == "1" and re.fullmatch(r"[-+]\d+\.\d\d", cells[8])
    assert cells[9:] == ["n = 1: no interval", "–", "–"]
    table2 = r.stdout.split("## Table 2")[1]
    assert "n = 1: no interval" in next(x for x in table2.splitlines() if "stochastic linear pL=0.5" in x)
    with open(tmp_path / "t" / "table1.csv", newline="") as f:
        sd_row = next(x for x in csv.DictReader(f) if x["pL"] == "0.5")
    assert sd_row["verdict"] == "n = 1: no interval"
    assert sd_row["p_value"] == sd_row["diff_ci95_low_pct"] == ""


def test_plot_from_real_runs(smoke_runs, tmp_path):
    out = tmp_path / "figs"
    r = run_sdrun("plot", str(smoke_runs), "--out", str(out), cwd=smoke_runs)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["fig3_digits_d8.pdf", "fig3_digits_d8.png",
                                                     "fig7_digits_d8.pdf", "fig7_digits_d8.png"]
    for fig in ("fig3", "fig7"):
        with Image.open(out / f"{fig}_digits_d8.png") as im:
            assert im.width > 1000 and im.height > 400
        assert (out / f"{fig}_digits_d8.pdf").read_bytes().startswith(b"%PDF")
    # Smoke runs have one pL < 1 and one depth: nothing for Fig. 8.
    reasons = [x for x in r.stderr.splitlines() if " skipped: " in x and not x.startswith("skipped ")]
    assert [x.split(" skipped:")[0] for x in reasons] == ["Fig. 4", "Fig. 8 left", "Fig. 8 right"]


def test_report_page_holds_sdrun_tables_tables_figures_and_analyses(smoke_runs, tmp_path, capsys):
    from sdrun.report.tables import main as table_main
    from sdrun.report.page import main as report_main

    root = tmp_path / "runs"
    shutil.copytree(smoke_runs, root)  # the analysis added below stays out of the other tests
    analysis = root / "runs" / "single" / "analysis"  # `sdrun analyze`'s output, in its format
    analysis.mkdir()
    (analysis / "analysis.json").write_text(json.dumps({"command": ["sdrun", "analyze"], "runs": []}))
    (analysis / "report.txt").write_text("test-time rule        12.34\n")
    Image.new("RGB", (8, 8)).save(analysis / "ensemble.png")
    dirs = [str(root / "sweep"), str(root / "runs")]

    assert table_main(dirs) == 0
    tables = capsys.readouterr().out
    out = tmp_path / "report"
    assert report_main([*dirs, "--out", str(out)]) == 0
    page = (out / "REPORT.md").read_text()
    assert tables.strip() in page  # the very tables `sdrun table` prints
    assert "vs constant" in page and "ratio 95% CI" in page  # Welch's comparisons, on the page too
    assert sorted(p.name for p in out.iterdir()) == ["REPORT.md", "analysis1_ensemble.png", "fig3_digits_d8.png",
                                                     "fig7_digits_d8.png", "tables"]
    for name in ("fig3_digits_d8.png", "fig7_digits_d8.png", "analysis1_ensemble.png"):
        assert f"]({name})" in page
    versions = results(smoke_runs)[0]["versions"]
    for line in ("- **Runs**: 5 finished below", "- **Seeds**: 1 2 3", "- **Device**: cpu", "- **Precision**: fp32",
                 f"torch {versions['torch']}", "- **Training time** (training passes only, all runs): "):
        assert line in page, line
    assert "test-time rule        12.34" in page
    not_shown = page.split("## Not shown")[1]
    assert "- Fig. 4 skipped: " in not_shown and "- Fig. 8 left skipped: " in not_shown
    assert f"- run `{root / 'runs' / 'killed'}`: unfinished: no results.json" in not_shown
    assert "sdrun analyze" not in not_shown  # it was found
    capsys.readouterr()
    assert report_main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"sdrun report: error: {tmp_path / 'missing'} is not a directory\n"


@pytest.mark.parametrize("command", ["table", "plot"])
def test_bad_input_is_one_line(tmp_path, command):
    out = ["--out", str(tmp_path / "o")]
    r = sdrun_main(command, str(tmp_path / "missing"), *out, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == f"sdrun {command}: error: {tmp_path / 'missing'} is not a directory"
    (tmp_path / "empty").mkdir()
    r = sdrun_main(command, str(tmp_path / "empty"), *out, cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "no finished runs" in r.stderr
    r = sdrun_main(command, "--bogus", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
