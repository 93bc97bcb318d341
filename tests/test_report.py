"""sdrun.report.collect and sdrun.report.tables on hand-written run directories: exact aggregation and skipping."""

import csv
import json
import math
import statistics

import pytest

from sdrun import paper
from sdrun.report import stats
from sdrun.report.tables import markdown, seeds_notes, table1_rows, table2_rows, write_outputs
from sdrun.report.collect import find_runs, group_runs
from tests.run_fixtures import write_run


def tables(*roots):
    runs, skipped = find_runs(roots)
    groups, notes = group_runs(runs)
    return table1_rows(groups), table2_rows(groups), notes, skipped


def row(rows, **match):
    (found,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return found


def test_mean_and_sample_std_over_seeds_beside_the_paper(tmp_path):
    for seed, err in zip((1, 2, 3), (5.0, 5.5, 6.5)):
        write_run(tmp_path / "sweep" / str(seed), seed=seed, error=err)
    for seed, err in zip((1, 2), (6.0, 7.0)):
        write_run(tmp_path / f"runs/const_s{seed}", pL=1.0, seed=seed, error=err)
    t1, _, notes, skipped = tables(tmp_path)
    assert not notes and not skipped
    sd = row(t1, pL=0.5)
    assert sd["n"] == 3 and sd["seeds"] == "1 2 3"
    assert sd["test_error_pct_mean"] == pytest.approx(17 / 3)
    assert sd["test_error_pct_std"] == pytest.approx(math.sqrt(((5 - 17 / 3) ** 2 + (5.5 - 17 / 3) ** 2
                                                                + (6.5 - 17 / 3) ** 2) / 2))
    assert sd["paper_test_error_pct"] == 5.25 and sd["diff_vs_paper_pct"] == pytest.approx(17 / 3 - 5.25)
    const = row(t1, pL=1.0)
    assert (const["n"], const["test_error_pct_mean"], const["paper_test_error_pct"]) == (2, 6.5, 6.41)
    assert const["test_error_pct_std"] == pytest.approx(math.sqrt(0.5))


def test_table1_reports_the_best_validation_epoch_not_the_last(tmp_path):
    write_run(tmp_path / "a", error=4.0, final_error=9.0)
    (r,) = tables(tmp_path)[0]
    assert r["test_error_pct_mean"] == 4.0 and r["test_error_pct_std"] is None


def test_imagenet_rows_say_last_epoch_and_give_fb_resnet_torchs_best_over_epochs(tmp_path):
    # No validation set (ImageNet's default): the row is the last epoch's test error; the lowest over
    # the epochs (what fb.resnet.torch prints) comes beside it, in a note, the CSV and the LaTeX.
    for seed, last, best in ((1, 22.0, 21.5), (2, 23.0, 22.5)):
        write_run(tmp_path / "in" / str(seed), dataset="imagenet", depth=152, epochs=120, num_blocks=50, seed=seed,
                  error=last, best_error=best, selection="last_epoch")
    # An ImageNet run written before results.json had best_test_error_pct: readable, the best unknown.
    old = write_run(tmp_path / "old", dataset="imagenet", depth=152, epochs=120, num_blocks=50, pL=1.0,
                    error=22.5, selection="last_epoch")
    data = json.loads((old / "results.json").read_text())
    del data["best_test_error_pct"], data["best_test_epoch"]
    (old / "results.json").write_text(json.dumps(data))
    write_run(tmp_path / "c10", error=5.0, best_error=4.1)  # best-validation selection: no best-over-epochs
    t1, t2, notes, skipped = tables(tmp_path)
    assert not skipped
    sd, const = row(t1, dataset="imagenet", pL=0.5), row(t1, dataset="imagenet", pL=1.0)
    c10 = row(t1, dataset="cifar10")
    assert (sd["selection"], sd["test_error_pct_mean"], sd["paper_test_error_pct"]) == ("last_epoch", 22.5, 21.98)
    assert sd["best_test_error_pct_mean"] == 22.0 and sd["best_test_error_pct_std"] == pytest.approx(math.sqrt(0.5))
    assert const["selection"] == "last_epoch" and const["best_test_error_pct_mean"] is None
    assert c10["selection"] == "best_val" and c10["best_test_error_pct_mean"] is None  # selected on test: not shown
    md = markdown(t1, t2, notes)
    assert "No validation set (ImageNet): the test error shown is the last epoch's top-1" in md
    assert ("- imagenet depth 152 stochastic linear pL=0.5: last epoch 22.50 ± 0.71, "
            "best over epochs 22.00 ± 0.71") in md
    assert "- imagenet depth 152 constant depth: last epoch 22.50, best over epochs not recorded" in md
    assert "cifar10 depth 110 stochastic linear pL=0.5: last epoch" not in md and "4.10" not in md
    write_outputs(tmp_path / "out", t1, t2, md)
    with open(tmp_path / "out" / "table1.csv", newline="") as f:
        rows = {(r["dataset"], r["pL"]): r for r in csv.DictReader(f)}
    assert rows[("imagenet", "0.5")]["best_test_error_pct_mean"] == "22.0"
    assert rows[("imagenet", "1.0")]["best_test_error_pct_mean"] == ""
    assert rows[("cifar10", "0.5")]["selection"] == "best_val"
    tex = (tmp_path / "out" / "table1.tex").read_text()
    assert "No validation set (ImageNet)" in tex and "best over epochs 22.00 $\\pm$ 0.71" in tex


def test_paper_figures_only_for_the_papers_setting(tmp_path):
    write_run(tmp_path / "short", epochs=100)                       # not the 500-epoch recipe
    write_run(tmp_path / "uniform", survival="uniform")             # not the paper's default
    write_run(tmp_path / "c100", dataset="cifar100", pL=1.0)
    write_run(tmp_path / "in120", dataset="imagenet", depth=152, epochs=120, num_blocks=50)
    t1, t2, _, _ = tables(tmp_path)
    assert row(t1, epochs=100)["paper_test_error_pct"] is None
    assert row(t1, survival="uniform")["paper_test_error_pct"] is None
    assert row(t1, dataset="cifar100")["paper_test_error_pct"] == 27.22
    assert row(t1, dataset="imagenet")["paper_test_error_pct"] == 21.98
    assert row(t2, dataset="cifar100")["paper_train_time_min"] == 20 * 60 + 51


def test_unfinished_crashed_and_corrupt_runs_are_skipped_with_a_reason(tmp_path):
    write_run(tmp_path / "good")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "results.json").write_text('{"status": "fini')
    write_run(tmp_path / "crashed")
    data = json.loads((tmp_path / "crashed" / "results.json").read_text())
    (tmp_path / "crashed" / "results.json").write_text(json.dumps({**data, "status": "crashed"}))
    write_run(tmp_path / "nan", error=float("nan"))
    write_run(tmp_path / "nokey")
    data = json.loads((tmp_path / "nokey" / "results.json").read_text())
    del data["train_time_per_epoch_s"]
    (tmp_path / "nokey" / "results.json").write_text(json.dumps(data))
    (tmp_path / "running" / ".hydra").mkdir(parents=True)
    (tmp_path / "running" / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "results.json").write_text("[1, 2]")

    t1, _, _, skipped = tables(tmp_path)
    assert [r["n"] for r in t1] == [1]
    reasons = {s.path.name: s.reason for s in skipped}
    assert set(reasons) == {"torn", "crashed", "nan", "nokey", "running", "list"}
    assert reasons["torn"].startswith("corrupt results.json")
    assert reasons["crashed"] == "status is 'crashed', not 'finished'"
    assert "test_error_at_best_val_pct" in reasons["nan"]
    assert reasons["nokey"] == "results.json lacks train_time_per_epoch_s"
    assert reasons["running"] == "unfinished: no results.json (2 epoch(s) in metrics.jsonl)"
    assert "not a JSON object" in reasons["list"]


def test_runs_with_other_recipes_are_split_and_said_so(tmp_path):
    write_run(tmp_path / "a1", seed=1, error=5.0)
    write_run(tmp_path / "a2", seed=2, error=6.0)
    write_run(tmp_path / "b1", seed=1, error=9.0, epochs=300, config={"batch_size": 64})
    write_run(tmp_path / "c1", seed=1, error=7.0, device="cpu")
    t1, t2, notes, _ = tables(tmp_path)
    assert sorted((r["n"], r["test_error_pct_mean"]) for r in t1) == [(1, 7.0), (1, 9.0), (2, 5.5)]
    variants = {r["test_error_pct_mean"]: r["variant"] for r in t1}
    assert "batch_size=64" in variants[9.0] and "epochs=300" in variants[9.0]
    assert "runtime.device=cpu" in variants[7.0] and "runtime.device=cuda" in variants[5.5]
    (note,) = notes
    assert note.startswith("cifar10 depth 110 pL=0.5 linear: runs differ in batch_size, epochs")
    assert "not averaged" in note
    md = markdown(t1, t2, notes)
    assert "differs in" in md and "Not averaged together" in md


def test_runs_of_other_precisions_or_gpus_are_separate_rows(tmp_path):
    # tf32 twice on H200s (seeds 1, 2; one said 'auto', one 'tf32': the resolved value counts),
    # bf16 on an H200, fp32 on an H200, tf32 on an A100.
    write_run(tmp_path / "tf32_1", seed=1, error=5.0, precision="tf32", config={"precision": "auto"})
    write_run(tmp_path / "tf32_2", seed=2, error=6.0, precision="tf32", config={"precision": "tf32"})
    write_run(tmp_path / "bf16", seed=1, error=7.0, precision="bf16", config={"precision": "bf16"})
    write_run(tmp_path / "fp32", seed=1, error=8.0, precision="fp32", config={"precision": "fp32"})
    write_run(tmp_path / "a100", seed=1, error=9.0, precision="tf32", gpu="NVIDIA A100-SXM4-80GB")
    t1, _, notes, skipped = tables(tmp_path)
    assert not skipped
    by_error = {r["test_error_pct_mean"]: r for r in t1}
    assert sorted(by_error) == [5.5, 7.0, 8.0, 9.0]
    assert by_error[5.5]["n"] == 2
    assert "runtime.precision=tf32" in by_error[5.5]["variant"]
    assert "runtime.precision=bf16" in by_error[7.0]["variant"]
    assert "runtime.precision=fp32" in by_error[8.0]["variant"]
    assert "runtime.gpu=NVIDIA A100-SXM4-80GB" in by_error[9.0]["variant"]
    assert "runtime.gpu=NVIDIA H200" in by_error[5.5]["variant"]
    (note,) = notes
    assert "runtime.gpu" in note and "runtime.precision" in note


def test_constant_depth_runs_pool_across_survival_and_duplicates_count_once(tmp_path):
    # pL = 1 is the same network under both rules: one group; the same seed twice is one run.
    write_run(tmp_path / "lin", pL=1.0, survival="linear", seed=1, error=6.0)
    write_run(tmp_path / "uni", pL=1.0, survival="uniform", seed=1, error=6.0)
    write_run(tmp_path / "uni2", pL=1.0, survival="uniform", seed=2, error=8.0)
    t1, _, _, skipped = tables(tmp_path)
    (r,) = t1
    assert (r["n"], r["test_error_pct_mean"], r["survival"]) == (2, 7.0, "")
    (dup,) = skipped
    assert "duplicate of" in dup.reason and dup.path.name in ("lin", "uni")


def test_table2_ratios_per_epoch(tmp_path):
    write_run(tmp_path / "c1", pL=1.0, seed=1, per_epoch_s=100.0)
    write_run(tmp_path / "c2", pL=1.0, seed=2, per_epoch_s=110.0)
    write_run(tmp_path / "s1", pL=0.5, seed=1, per_epoch_s=75.0)
    write_run(tmp_path / "s2", pL=0.5, seed=2, per_epoch_s=82.0, epochs=500)
    write_run(tmp_path / "u", pL=0.2, survival="uniform", per_epoch_s=30.0, device="cpu")  # no baseline
    _, t2, _, _ = tables(tmp_path)
    c, s = row(t2, pL=1.0), row(t2, pL=0.5)
    assert c["measured_ratio"] == 1.0 and c["expected_depth_ratio"] == 1.0 and c["paper_ratio"] == 1.0
    assert s["train_time_per_epoch_s_mean"] == 78.5
    assert s["measured_ratio"] == pytest.approx(78.5 / 105.0)
    assert s["expected_depth_ratio"] == pytest.approx(40.25 / 54)
    assert s["paper_ratio"] == pytest.approx((15 * 60 + 7) / (20 * 60 + 42)) == paper.table2_time_ratio("cifar10", 110, 500)
    assert s["train_time_s_mean"] == 78.5 * 500
    assert row(t2, pL=0.2)["measured_ratio"] is None
    # The ratio's interval: Welch's on the logs of the per-epoch times, exponentiated.
    assert (s["ratio_ci95_low"], s["ratio_ci95_high"]) == pytest.approx(stats.ratio_interval([75.0, 82.0],
                                                                                             [100.0, 110.0]))
    assert s["ratio_ci95_low"] < 78.5 / 105.0 < s["ratio_ci95_high"]
    assert c["ratio_ci95_low"] is None and row(t2, pL=0.2)["ratio_ci95_low"] is None
    ratio_line = next(x for x in markdown([], t2, []).splitlines() if "stochastic linear pL=0.5" in x)
    assert f"[{s['ratio_ci95_low']:.2f}, {s['ratio_ci95_high']:.2f}]" in ratio_line


# R's documented t.test(extra ~ group, data = sleep) (datasets::sleep), shifted by +5 points so they
# read as test errors (a shift changes neither the difference's interval nor the p-value): t = -1.8608,
# df = 17.776, p-value = 0.07939, 95 percent CI -3.3654832 0.2054832 (tests/test_stats.py).
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_stochastic_vs_constant_difference_interval_p_and_verdict(tmp_path):
    for seed, (sd, const) in enumerate(zip(SLEEP_1, SLEEP_2), start=1):
        write_run(tmp_path / f"sd{seed}", seed=seed, error=5 + sd)
        write_run(tmp_path / f"c{seed}", pL=1.0, seed=seed, error=5 + const)
    write_run(tmp_path / "other", pL=0.5, survival="uniform", seed=1, error=2.0)  # n = 1 against 10
    t1, _, _, _ = tables(tmp_path)
    r = row(t1, pL=0.5, survival="linear")
    assert r["diff_vs_constant_pct"] == pytest.approx(0.75 - 2.33)
    assert r["diff_ci95_low_pct"] == pytest.approx(-3.3654832, abs=5e-8)
    assert r["diff_ci95_high_pct"] == pytest.approx(0.2054832, abs=5e-8)
    assert r["p_value"] == pytest.approx(0.07939, abs=5e-6) and r["welch_df"] == pytest.approx(17.776, abs=5e-4)
    assert r["verdict"] == "not distinguishable with these seeds"
    # Seeds needed for the paper's CIFAR-10+ difference at the spread observed here.
    assert r["paper_diff_pct"] == pytest.approx(5.25 - 6.41)
    spread = math.sqrt((9 * statistics.variance(SLEEP_1) + 9 * statistics.variance(SLEEP_2)) / 18)
    assert r["pooled_std_pct"] == pytest.approx(spread)
    n = r["seeds_needed_80pct_power"]
    assert n == stats.seeds_needed(1.16, spread)
    assert stats.power(n - 1, 1.16, spread) < 0.8 <= stats.power(n, 1.16, spread)
    const = row(t1, pL=1.0)
    assert all(const[k] is None for k in ("diff_vs_constant_pct", "p_value", "verdict", "seeds_needed_80pct_power"))
    other = row(t1, survival="uniform")
    assert other["verdict"] == "n = 1: no interval" and other["p_value"] is None
    assert other["seeds_needed_80pct_power"] is None and other["paper_diff_pct"] is None  # not the paper's setting

    md = markdown(t1, [], [])
    line = next(x for x in md.splitlines() if "stochastic linear pL=0.5" in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-4:] == ["-1.58", "[-3.37, +0.21]", "0.079", "not distinguishable with these seeds"]
    line = next(x for x in md.splitlines() if "uniform" in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-3:] == ["n = 1: no interval", "–", "–"]
    (note,) = seeds_notes(t1)
    assert note == (f"cifar10 depth 110 stochastic linear pL=0.5: the paper's difference to constant depth, "
                    f"-1.16 points, needs {n} seeds per side for 80 % power at the observed spread "
                    f"(pooled sd {spread:.2f}; two-sided t-test at 5 %)")
    assert f"- {note}" in md.split("## Table 2")[0]


def test_clear_differences_get_a_direction(tmp_path):
    for seed in (1, 2, 3):
        write_run(tmp_path / f"sd{seed}", seed=seed, error=5.0 + 0.1 * seed)
        write_run(tmp_path / f"c{seed}", pL=1.0, seed=seed, error=6.5 - 0.1 * seed)
        write_run(tmp_path / f"u{seed}", pL=0.2, survival="uniform", seed=seed, error=9.0 + 0.2 * seed)
    t1, _, _, _ = tables(tmp_path)
    assert row(t1, survival="linear", pL=0.5)["verdict"] == "lower"
    assert row(t1, survival="uniform")["verdict"] == "higher"
    assert row(t1, pL=0.5)["diff_ci95_high_pct"] < 0 < row(t1, survival="uniform")["diff_ci95_low_pct"]


def test_outputs_csv_latex_markdown(tmp_path):
    write_run(tmp_path / "runs" / "a", pL=1.0, error=6.0)
    write_run(tmp_path / "runs" / "b", pL=0.5, error=5.0)
    t1, t2, notes, _ = tables(tmp_path / "runs")
    md = markdown(t1, t2, notes)
    paths = write_outputs(tmp_path / "out", t1, t2, md)
    assert all(p.is_file() for p in paths)
    with open(tmp_path / "out" / "table1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["pL"]), float(r["test_error_pct_mean"]), r["test_error_pct_std"]) for r in rows] == \
        [(1.0, 6.0, ""), (0.5, 5.0, "")]
    assert [(r["verdict"], r["p_value"], r["diff_ci95_low_pct"], r["seeds_needed_80pct_power"]) for r in rows] == \
        [("", "", "", ""), ("n = 1: no interval", "", "", "")]
    assert float(rows[1]["diff_vs_constant_pct"]) == -1.0 and float(rows[1]["paper_diff_pct"]) == pytest.approx(-1.16)
    tex = (tmp_path / "out" / "table1.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "test error (\\%)" in tex
    assert "n = 1: no interval" in tex and "95\\% CI" in tex
    assert "needs $\\geq$ 2 seeds per side to estimate" in tex and "80 \\% power" in tex
    assert "needs >= 2 seeds per side to estimate" in md
    with open(tmp_path / "out" / "table2.csv", newline="") as f:
        rows2 = list(csv.DictReader(f))
    assert "_ratio_no_interval" not in rows2[0] and rows2[1]["ratio_ci95_low"] == ""
    assert "n = 1: no interval" in md.split("## Table 2")[1]
    assert "| constant depth" in md and "5.00" in md and "5.25" in md and "-0.25" in md
    table2_md = md.split("## Table 2")[1]
    assert "8h 20m" in table2_md and "20h 42m" in table2_md and "0.73" in table2_md
