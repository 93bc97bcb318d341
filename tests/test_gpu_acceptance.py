"""scripts/gpu_acceptance.sh in its CPU smoke mode: the GPU run's script cannot rot in CI.

One real subprocess (the script is bash driving sdrun subprocesses): every step runs with
tiny sizes on the CPU, and the report it writes holds every part, in at most 8 files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_cpu_smoke_runs_every_step_and_reports_it(tmp_path):
    data = write_image_folder(tmp_path / "cifar10", classes=CLASSES, per_class=(3, 2), ext="jpg")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_acceptance.sh"), str(out), "--cpu-smoke",
                        "--data", str(data)], env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                   "TMPDIR": str(tmp_path), "HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["acceptance.log", "gpu_report.json", "gpu_report.md", "runs.tar.gz"], files

    rep = json.loads((out / "gpu_report.json").read_text())
    assert rep["mode"] == "cpu-smoke" and rep["environment"]["hardware"]["type"] == "cpu"
    assert [s["step"] for s in rep["steps"]] == ["pytest", "bench_fp32", "train_a", "train_b", "bench_bf16"]
    assert all(s["status"] == "ok" for s in rep["steps"]), rep["steps"]
    # The CUDA tests were collected and, without a GPU, each skipped with its reason.
    tests = rep["pytest"]["tests"]
    assert len(tests) >= 10 and rep["pytest"]["counts"]["failed"] == rep["pytest"]["counts"]["error"] == 0
    assert all(t["status"] == "skipped" and "needs a CUDA GPU" in t["message"] for t in tests)
    assert set(rep["bench"]) == {"fp32", "bf16"}
    for b in rep["bench"].values():
        assert set(b["runs"]) == {"eager pL=1.0", "eager pL=0.5"}
        assert b["sd_ratio_eager"] > 0 and b["peak_memory_mib"] > 0
        assert all(r["images_per_s"] > 0 and r["projected_500_epochs_h"] > 0 for r in b["runs"].values())
    a, b = rep["train"]["a_epochs"], rep["train"]["b_short_schedule"]
    assert a["finished"] and a["epochs_done"] == 2 and a["precision"] == "fp32"
    assert a["train_images_per_epoch"] == 24 and a["projected_500_epochs_45k_h"] > 0
    assert b["finished"] and b["epochs_done"] == 3
    assert "inside" in rep["prediction"]["verdict"] or "OUTSIDE" in rep["prediction"]["verdict"]
    assert rep["complete"] is True
    md = (out / "gpu_report.md").read_text()
    assert "sdrun bench" in md and "predicted before the run" in md and "| fp32 |" in md
    listing = subprocess.run(["tar", "-tzf", str(out / "runs.tar.gz")], capture_output=True, text=True).stdout
    assert "a_epochs/results.json" in listing and "b_short_schedule/metrics.jsonl" in listing
    print(f"cpu smoke: {wall:.1f} s")
