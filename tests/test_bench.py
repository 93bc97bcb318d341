"""`sdrun bench` end to end, shrunk to seconds: the report's structure and its arithmetic.

No timing threshold here (that is what the benchmark itself is for): only that it measures
what it says, in one process, and writes it all down. The console script runs it once; the
other cases go through the same main() in this process.
"""

import json

import pytest

from sdrun.stochastic import expected_active_blocks, survival_probs
from tests.conftest import run_sdrun, sdrun_main

SMALL = ["--depth", "8", "--deep-depth", "14", "--batch-size", "16", "--steps", "1", "--repeats", "2",
         "--warmup", "1", "--deep-steps", "1", "--deep-repeats", "2", "--trainer-steps", "2",
         "--trainer-repeats", "1", "--eval-images", "64", "--eval-batch-size", "32", "--device", "cpu",
         "--threads", "1"]  # one thread: two OpenMP threads stall badly on a shared, loaded 2-core machine


def test_bench_writes_every_section(tmp_path):
    r = run_sdrun("bench", *SMALL, "--out", "out/bench.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    env, res = report["environment"], report["results"]
    assert env["device"] == "cpu" and "torch" in env["versions"] and env["torch_threads"] >= 1
    assert set(res) == {"sd", "layout", "overhead", "eval", "deep_sd", "deep_eval"}  # compile: CUDA only

    for key, depth in (("sd", 8), ("deep_sd", 14)):
        sd = res[key]
        L = (depth - 2) // 2
        const, stoch = sd["runs"]["pL=1.0"], sd["runs"]["pL=0.5"]
        assert len(const["step_s_all"]) == len(stoch["step_s_all"]) == 2
        assert const["active_blocks_mean"] == L  # constant depth runs every block
        assert 0 < stoch["active_blocks_mean"] <= L
        assert sd["ratio_sd_over_constant"] == pytest.approx(stoch["step_s_median"] / const["step_s_median"])
        paired = sorted(s / c for s, c in zip(stoch["step_s_all"], const["step_s_all"]))
        assert sd["ratio_paired_median"] == pytest.approx(sum(paired) / 2)
        assert sd["theory_expected_compute"] == pytest.approx(expected_active_blocks(survival_probs(L, 0.5)) / L)
        assert sd["peak_memory_bytes"] > 0
    ov = res["overhead"]
    assert ov["overhead_fraction"] == pytest.approx(1 - ov["trainer_images_per_s"] / ov["bare_images_per_s"])
    assert ov["checkpoint_write_s"] > 0
    assert res["eval"]["images"] == 64 and res["eval"]["images_per_s"] > 0
    assert res["layout"]["speedup_channels_last"] > 0
    assert "ratio" in r.stdout and "overhead" in r.stdout and "img/s" in r.stdout


def test_bench_sections_and_bad_arguments(tmp_path):
    r = sdrun_main("bench", *SMALL, "--sections", "eval", "--out", "e.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert set(json.loads((tmp_path / "e.json").read_text())["results"]) == {"eval"}
    for bad in (["--sections", "sd,warp"], ["--steps", "0"], ["--device", "cuda:7"]):
        r = sdrun_main("bench", *SMALL, *bad, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, bad
        assert r.stderr.startswith("sdrun bench: error:") and len(r.stderr.strip().splitlines()) == 1, bad
