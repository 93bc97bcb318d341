"""The two GPU calls' scripts on the CPU: they cannot rot between GPU runs (issues 12, 21).

- `--plan` of scripts/gpu_acceptance.sh (call 1) and scripts/gpu_speed.sh (call 2): the step
  limits fit the issue's budgets (360 s, 300 s) and printing them runs no python;
- the CPU smoke modes (real subprocesses: the scripts are bash driving sdrun subprocesses) run
  every step of the plan, with the plan's limits, and report each part in at most 8 files;
- a bundle whose STAMP is not the checkout's sources is refused with one line, before anything
  runs (scripts/gpu_bundle.sh --check; no git needed, as on the GPU machine);
- the acceptance script's comment on the predicted run's schedule is what sdrun's own schedule
  code gives for its overrides.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import compose_cfg, write_image_folder

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BUDGETS = {"gpu_acceptance.sh": 360, "gpu_speed.sh": 300}  # the 6 and 5 minutes of command time


def python_trap(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose python/python3/pip leave a mark when run: PATH starts with stubs."""
    bin_dir, mark = tmp_path / "trap_bin", tmp_path / "python_ran"
    bin_dir.mkdir()
    for name in ("python", "python3", "pip", "pip3"):
        stub = bin_dir / name
        stub.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {mark}\nexit 1\n")
        stub.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}, mark


def plan(script: str, *args: str, env: dict | None = None) -> tuple[list[tuple[str, int]], int]:
    """(step, limit) rows and the total of `script --plan`; the total line must come last."""
    r = subprocess.run(["bash", str(SCRIPTS / script), "--plan", *args], capture_output=True, text=True,
                       env=env or {"PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode == 0 and not r.stderr, r.stderr
    lines = r.stdout.strip().splitlines()
    total = re.fullmatch(r"total: (\d+) s", lines[-1])
    assert total, lines[-1]
    rows = [(m.group(1), int(m.group(2))) for m in (re.match(r"^  (\w+) +(\d+) s", line) for line in lines[1:-1]) if m]
    assert len(rows) == len(lines) - 2, lines  # every line between the header and the total is a step
    return rows, int(total.group(1))


@pytest.mark.parametrize("script", sorted(BUDGETS))
def test_plan_fits_the_budget_and_runs_nothing(script, tmp_path):
    env, mark = python_trap(tmp_path)
    rows, total = plan(script, env=env)
    assert not mark.exists(), mark.read_text()  # no python, no pip: --plan only prints
    assert total <= BUDGETS[script]
    assert total == sum(limit for _, limit in rows)  # every second of the total is a line of the plan
    assert rows[-1][0] == "final" and all(limit > 0 for name, limit in rows if name != "final" and name != "compile")
    smoke_rows, smoke_total = plan(script, "--cpu-smoke", env=env)
    assert [n for n, _ in smoke_rows] == [n for n, _ in rows] and smoke_total == sum(limit for _, limit in smoke_rows)


@pytest.mark.parametrize("script", sorted(BUDGETS))
def test_bad_arguments_are_one_line_errors(script, tmp_path):
    for args in (["--bogus"], [], ["a", "b"], ["out", "--bundle"]):
        r = subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path, timeout=60)
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout)
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"{script[:-3]}: error:"), (args, r.stderr)


def smoke(script: str, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(SCRIPTS / script), str(out), "--cpu-smoke", *args],
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
                            "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=400)
    return r, time.perf_counter() - t0


def check_steps_follow_the_plan(rep: dict, script: str, cuda_only: dict[str, str]) -> None:
    """The steps that ran are the plan's, in its order, each under at least the plan's (smoke)
    limit (plus what the steps before it left unused); the ones that cannot run on the CPU say so."""
    rows, total = plan(script, "--cpu-smoke")
    planned = [(n, limit) for n, limit in rows if n not in ("reports", "final")]
    assert [s["step"] for s in rep["steps"]] == [n for n, _ in planned]
    for s, (_, limit) in zip(rep["steps"], planned):
        assert s["plan_limit_s"] == limit, s
        if s["step"] in cuda_only:
            assert s["status"] == f"skipped: {cuda_only[s['step']]}", s
        else:
            assert s["status"] == "ok" and limit <= s["limit_s"] < total, s
    assert rep["complete"] is True


def test_acceptance_cpu_smoke_runs_every_step_and_reports_it(tmp_path):
    data = write_image_folder(tmp_path / "cifar10", classes=CLASSES, per_class=(3, 2), ext="jpg")
    r, wall = smoke("gpu_acceptance.sh", tmp_path, "--data", str(data))
    out = tmp_path / "out"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["acceptance.log", "gpu_report.json", "gpu_report.md", "runs.tar.gz"], files

    rep = json.loads((out / "gpu_report.json").read_text())
    assert rep["mode"] == "cpu-smoke" and rep["environment"]["hardware"]["type"] == "cpu"
    check_steps_follow_the_plan(rep, "gpu_acceptance.sh", {
        "install": "cpu-smoke runs the interpreter's own sdrun",
        "bench_tf32": "needs CUDA (TF32 is a CUDA math mode)",
        "graphs": "needs CUDA (speed=graphs captures CUDA graphs)"})
    # The CUDA tests of both files were collected, compile ones in their own step; without a
    # GPU each skipped with its reason. test_cuda.py's no-sync tests come first.
    tests, compiled = rep["pytest"]["tests"], rep["compile"]["tests"]
    assert len(tests) >= 10 and all(t["status"] == "skipped" and "needs a CUDA GPU" in t["message"] for t in tests)
    assert {t["test"].split("::")[0] for t in tests} == {"test_cuda", "test_cuda_speed"}
    assert "sync" in tests[0]["test"] and tests[0]["test"].startswith("test_cuda::")
    assert not any("compile" in t["test"] for t in tests)
    assert compiled and all("compile" in t["test"] and t["status"] == "skipped" for t in compiled)
    assert set(rep["bench"]) == {"fp32", "bf16"}
    for b in rep["bench"].values():
        assert set(b["runs"]) == {"eager pL=1.0", "eager pL=0.5"} and "partial" not in b
        assert b["sd_ratio_eager"] > 0 and b["peak_memory_mib"] > 0
        assert all(r["images_per_s"] > 0 and r["projected_500_epochs_h"] > 0 for r in b["runs"].values())
    a, b = rep["train"]["a_epochs"], rep["train"]["b_short_schedule"]
    assert a["finished"] and a["epochs_done"] == 2 and a["precision"] == "fp32"
    assert a["train_images_per_epoch"] == 24 and a["projected_500_epochs_45k_h"] > 0
    assert b["finished"] and b["epochs_done"] == 3
    # milestones [1, 2] under fidelity=reference: the lr drops at the epochs numbered 1 and 2.
    assert b["schedule_planned"] == b["schedule_run"] == [[0.01, 1], [0.001, 2]]
    assert "inside" in rep["prediction"]["verdict"] or "OUTSIDE" in rep["prediction"]["verdict"]
    md = (out / "gpu_report.md").read_text()
    assert "sdrun bench" in md and "predicted before the run" in md and "| fp32 |" in md
    assert "the epochs it ran had 1/2 epochs at lr 0.01/0.001" in md
    listing = subprocess.run(["tar", "-tzf", str(out / "runs.tar.gz")], capture_output=True, text=True).stdout
    assert "a_epochs/results.json" in listing and "b_short_schedule/metrics.jsonl" in listing
    assert "./bench_fp32.json" in listing and "./pytest.xml" in listing
    print(f"acceptance cpu smoke: {wall:.1f} s")


def test_speed_cpu_smoke_runs_every_step_and_reports_it(tmp_path):
    r, wall = smoke("gpu_speed.sh", tmp_path)
    out = tmp_path / "out"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["speed.log", "speed_raw.tar.gz", "speed_report.json", "speed_report.md"], files
    rep = json.loads((out / "speed_report.json").read_text())
    check_steps_follow_the_plan(rep, "gpu_speed.sh", {"install": "cpu-smoke runs the interpreter's own sdrun"})
    runs = rep["concurrent"]["runs"]
    assert sorted(runs, key=int) == ["1", "2", "4", "8"] and [len(runs[k]["per_process_images_per_s"]) for k in
                                                              ("1", "2", "4", "8")] == [1, 2, 4, 8]
    assert all(r["aggregate_images_per_s"] > 0 and r["table1_cifar10_6_runs_h"] > 0 for r in runs.values())
    assert set(rep["compile_bench"]["modes"]) == {"eager"}  # the smoke mode does not compile (see the script)
    tests = rep["compile_tests"]["tests"]
    assert tests and all("compile" in t["test"] and t["status"] == "skipped" for t in tests)
    assert len(rep["projections_h"]) == 1 + 2 * 4 and all(h > 0 for h in rep["projections_h"].values())
    listing = subprocess.run(["tar", "-tzf", str(out / "speed_raw.tar.gz")], capture_output=True, text=True).stdout
    assert "./bench_concurrent.json" in listing and "./bench_compile.json" in listing
    print(f"speed cpu smoke: {wall:.1f} s")


def copy_of_the_sources(tmp_path: Path) -> Path:
    """What the stamp covers, in a folder outside git (as the GPU machine gets the checkout)."""
    tree = tmp_path / "tree"
    for name in ("sdrun", "conf"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "scripts").mkdir()
    shutil.copy(REPO / "pyproject.toml", tree)
    shutil.copy(SCRIPTS / "gpu_bundle.sh", tree / "scripts")
    return tree


def test_the_bundle_stamp_matches_its_sources_and_nothing_else(tmp_path):
    tree = copy_of_the_sources(tmp_path)
    bundle, env = tmp_path / "bundle", {"PATH": "/usr/bin:/bin"}
    bundle_sh = ["bash", str(tree / "scripts" / "gpu_bundle.sh")]
    assert subprocess.run([*bundle_sh, "--stamp", str(bundle)], env=env, timeout=60).returncode == 0
    stamp = dict(line.split("=", 1) for line in (bundle / "STAMP").read_text().splitlines())
    assert stamp["commit"] == stamp["dirty"] == "unknown" and re.fullmatch(r"[0-9a-f]{64}", stamp["source_sha256"])
    r = subprocess.run([*bundle_sh, "--check", str(bundle)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("bundle matches this checkout"), r.stderr

    (tree / "sdrun" / "tools" / "bench.py").write_text((tree / "sdrun" / "tools" / "bench.py").read_text() + "# edited after the bundle\n")
    r = subprocess.run([*bundle_sh, "--check", str(bundle)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"stale bundle: {bundle}/STAMP was built from other sdrun sources")
    (tree / "sdrun" / "__pycache__").mkdir()  # bytecode is not source: it changes nothing
    (tree / "sdrun" / "__pycache__" / "bench.cpython-312.pyc").write_bytes(b"\0")
    subprocess.run([*bundle_sh, "--stamp", str(bundle)], env=env, check=True, timeout=60)
    assert subprocess.run([*bundle_sh, "--check", str(bundle)], env=env, capture_output=True,
                          timeout=60).returncode == 0


@pytest.mark.parametrize("script", sorted(BUDGETS))
def test_gpu_mode_refuses_a_stale_bundle_before_running_anything(script, tmp_path):
    bundle = tmp_path / "bundle"
    subprocess.run(["bash", str(SCRIPTS / "gpu_bundle.sh"), "--stamp", str(bundle)], check=True, timeout=60,
                   env={"PATH": "/usr/bin:/bin"})
    text = (bundle / "STAMP").read_text()
    (bundle / "STAMP").write_text(re.sub(r"source_sha256=\w+", "source_sha256=" + "0" * 64, text))
    env, mark = python_trap(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(SCRIPTS / script), str(out), "--bundle", str(bundle)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stdout + r.stderr
    assert r.stderr.startswith(f"{script[:-3]}: error: stale bundle: {bundle}/STAMP was built from other sdrun sources")
    assert "run make gpu-bundle again" in r.stderr
    assert not mark.exists() and not out.exists()  # refused before python, pip or the output folder


def test_the_predicted_runs_schedule_comment_is_what_sdrun_runs():
    """Finding 7 of issue 21: the comment said 8/3/1 epochs per lr; sdrun's own schedule code,
    on the config the script's train_b overrides compose to, says 7/3/2."""
    from sdrun.engine.schedule import epochs_per_lr

    text = (SCRIPTS / "gpu_acceptance.sh").read_text()
    gpu_branch = text[text.index("else\n    PY=${PYTHON:-python3}"):]
    overrides = re.search(r"TRAIN_B=\((.*?)\)\n", gpu_branch).group(1).replace('"', "").split()
    cfg = compose_cfg("dataset=cifar10", *overrides)
    segments = epochs_per_lr(cfg.epochs, cfg.optim)
    assert segments == [(0.1, 7), (0.01, 3), (0.001, 2)]
    assert f"sdrun.engine.schedule.epochs_per_lr(12, optim) = {segments}" in " ".join(
        line.lstrip("# ") for line in text.splitlines())
    assert "lr 0.1 for 7 epochs, 0.01 for 3, 0.001 for 2" in " ".join(line.lstrip("# ") for line in text.splitlines())
    assert re.search(r"^PREDICTED_ERROR=22\nPREDICTED_LOW=17\nPREDICTED_HIGH=28$", text, re.M)  # not retuned


def test_the_report_keeps_what_a_killed_step_left(tmp_path, monkeypatch):
    """A bench killed after its first timed repeat (the real partial file, made as in
    tests/test_bench.py) and a pytest cut off before its junit file: the report shows the
    partial figures, marked, and the tests that finished."""
    import importlib.util

    import torch

    from sdrun.tools.bench import Stepper, run_bench

    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPTS / "gpu_report.py")
    gpu_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_report)

    class Killed(Exception):
        pass

    out = tmp_path / "bench_fp32.json"
    real_steps = Stepper.steps

    def kill_after_a_saved_repeat(self, n, batches=None):
        if out.exists() and "runs" in json.loads(out.read_text())["results"].get("sd", {}):
            raise Killed
        return real_steps(self, n, batches)

    monkeypatch.setattr(Stepper, "steps", kill_after_a_saved_repeat)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Killed):
            run_bench(["--device", "cpu", "--sections", "sd", "--depth", "8", "--batch-size", "8", "--steps", "1",
                       "--repeats", "3", "--warmup", "1", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    bench = gpu_report.bench_results(tmp_path)
    assert bench["fp32"]["partial"] == "1 of 3 timed repeats" and bench["fp32"]["sd_ratio_eager"] > 0
    assert all(r["images_per_s"] > 0 for r in bench["fp32"]["runs"].values())

    (tmp_path / "pytest.log").write_text(
        "tests/test_cuda.py::test_step_and_gradient_statistics_never_sync_the_host[fp32] PASSED   [  6%]\n"
        "tests/test_cuda_speed.py::test_fused_sgd_matches_foreach_on_cuda FAILED   [ 12%]\n")
    pt = gpu_report.pytest_results(tmp_path, "pytest.xml", "pytest")
    assert [(t["test"], t["status"]) for t in pt["tests"]] == [
        ("test_cuda::test_step_and_gradient_statistics_never_sync_the_host[fp32]", "passed"),
        ("test_cuda_speed::test_fused_sgd_matches_foreach_on_cuda", "failed")]
    assert "did not finish" in pt["note"]
    assert gpu_report.lr_segments([0.1] * 7 + [0.01] * 3 + [0.001] * 2) == [[0.1, 7], [0.01, 3], [0.001, 2]]
