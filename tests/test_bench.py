"""`sdrun bench` end to end, shrunk to seconds: the report's structure and its arithmetic, and
that what it times is what `sdrun train` trains.

No timing threshold here (that is what the benchmark itself is for): only that it measures
what it says, in one process, and writes it all down. Every case goes through the CLI's main()
in this process (scripts/gpu_acceptance.sh and gpu_speed.sh run the installed `sdrun bench`,
and their CPU smoke tests in tests/test_gpu_acceptance.py run that four times).
"""

import json

import pytest

from sdrun.model.stochastic import expected_active_blocks, survival_probs
from tests.conftest import sdrun_main

SMALL = ["--depth", "8", "--deep-depth", "14", "--batch-size", "16", "--steps", "1", "--repeats", "2",
         "--warmup", "1", "--deep-steps", "1", "--deep-repeats", "2", "--trainer-steps", "2",
         "--trainer-repeats", "1", "--eval-images", "64", "--eval-batch-size", "32", "--device", "cpu",
         "--threads", "1"]  # one thread: two OpenMP threads stall badly on a shared, loaded 2-core machine


def test_bench_writes_every_section(tmp_path):
    r = sdrun_main("bench", *SMALL, "--out", "out/bench.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    env, res = report["environment"], report["results"]
    assert env["device"] == "cpu" and "torch" in env["versions"] and env["torch_threads"] >= 1
    assert env["precision"] == "fp32" and env["hardware"]["type"] == "cpu"  # auto on the CPU
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
    assert ov["data_path_fraction"] == pytest.approx(1 - ov["bare_images_per_s"] / ov["premade_images_per_s"])
    assert ov["steps_per_epoch"] == 2 and ov["data"].startswith("digits")
    assert ov["checkpoint_write_s"] > 0
    assert res["eval"]["images"] == 64 and res["eval"]["images_per_s"] > 0
    assert res["layout"]["speedup_channels_last"] > 0
    assert "ratio" in r.stdout and "overhead" in r.stdout and "img/s" in r.stdout
    # What was benched: the composed config of `sdrun train` with the options as its keys.
    assert report["config"]["fidelity"] == "reference" and report["config"]["composed"]["depth"] == 8
    assert report["config"]["overrides"][:3] == ["dataset=digits", "depth=8", "batch_size=16"]


def test_bench_sections_and_bad_arguments(tmp_path):
    r = sdrun_main("bench", *SMALL, "--sections", "eval", "--out", "e.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert set(json.loads((tmp_path / "e.json").read_text())["results"]) == {"eval"}
    for bad in (["--sections", "sd,warp"], ["--steps", "0"], ["--device", "cuda:7"], ["--precision", "tf32"],
                ["--precision", "fp16"], ["--set", "depth=20"], ["--set", "pL=0.3"], ["--set", "fidelity"],
                ["--set", "model.warp=1"], ["--set", "optim.lr=-1"],
                ["--set", "dataset=cifar10", "--set", "dataset.root=absent"],
                ["--batch-size", "2000"]):  # more than the digits' 1,237 training images: found at the first build
        r = sdrun_main("bench", *SMALL, *bad, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, bad
        assert r.stderr.startswith("sdrun bench: error:") and len(r.stderr.strip().splitlines()) == 1, bad


def test_speed_and_concurrent_sections_in_process(tmp_path, capsys):
    """--speed and --concurrent alone run only those sections; K real processes per K (forked
    on the CPU), their rates summed; graphs on the CPU and a bad K are one-line errors."""
    import torch

    from sdrun.tools.bench import run_bench

    threads = torch.get_num_threads()
    tiny = ["--device", "cpu", "--depth", "8", "--batch-size", "8", "--steps", "1", "--repeats", "2",
            "--warmup", "1", "--compile-warmup", "1", "--threads", "1", "--window", "0.3", "--chunk", "1"]
    try:
        out = tmp_path / "b.json"
        assert run_bench([*tiny, "--speed", "eager", "--concurrent", "1,2", "--out", str(out)]) == 0
        res = json.loads(out.read_text())["results"]
        assert set(res) == {"speed", "concurrent"}
        eager = res["speed"]["modes"]["eager"]
        assert eager["ratio_sd_over_constant"] == pytest.approx(eager["step_s_pL=0.5"] / eager["step_s_pL=1.0"])
        assert eager["projected_500_epochs_min_pL=0.5"] == pytest.approx(500 * 45_000 / eager["images_per_s_pL=0.5"] / 60)
        runs = res["concurrent"]["runs"]
        assert sorted(runs) == ["1", "2"] and [len(runs[k]["processes"]) for k in ("1", "2")] == [1, 2]
        for r in runs.values():
            assert all(p["images"] > 0 and p["seconds"] >= 0.3 for p in r["processes"])  # the whole window
            assert r["aggregate_images_per_s"] == pytest.approx(sum(p["images_per_s"] for p in r["processes"]))
        assert runs["1"]["speedup_over_one"] == 1.0 and res["concurrent"]["best_k"] in (1, 2)
        assert "concurrent K=2" in capsys.readouterr().out

        for bad in (["--speed", "graphs"], ["--concurrent", "0"], ["--speed", "warp"], ["--concurrent", "1,x"]):
            capsys.readouterr()
            try:
                code = run_bench([*tiny, *bad, "--out", str(tmp_path / "x.json")])
            except SystemExit as e:  # argparse's errors
                code = e.code
            err = capsys.readouterr().err
            assert code == 2 and err.startswith("sdrun bench: error:") and len(err.strip().splitlines()) == 1, bad
        assert not (tmp_path / "x.json").exists()  # refused before anything ran
    finally:
        torch.set_num_threads(threads)


def test_a_failing_concurrent_process_is_named_not_waited_for():
    from sdrun.launch.compose import compose
    from sdrun.tools.bench_concurrent import ConcurrentFailure, measure

    settings = {"warmup": 1, "window_s": 0.1, "chunk": 1, "barrier_timeout_s": 30, "cores": 1}
    cfg = compose("device=cpu", "depth=9", "batch_size=4")  # unchecked: each process's build fails
    with pytest.raises(ConcurrentFailure, match=r"concurrent K=2: ValueError: depth must be 6n\+2"):
        measure(2, settings, cfg, "cpu")


class Killed(Exception):
    """What a kill at that moment would end: raised from inside a running section."""


def test_the_report_is_on_disk_after_each_section_and_each_timed_repeat(tmp_path, monkeypatch):
    """A time limit can kill `sdrun bench` at any moment (scripts/gpu_acceptance.sh, gpu_speed.sh):
    what it measured before must already be on disk. The run is stopped from inside (1) the
    second section, (2) the second timed repeat of --speed; at that moment the report holds the
    finished first section, (2) the first repeat's figures marked partial; no temp file is left."""
    import torch

    import sdrun.tools.bench
    from sdrun.tools.bench import Stepper, run_bench

    out = tmp_path / "b.json"
    tiny = ["--device", "cpu", "--depth", "8", "--batch-size", "8", "--steps", "1", "--warmup", "1",
            "--compile-warmup", "1", "--threads", "1", "--eval-images", "16", "--eval-batch-size", "16",
            "--out", str(out)]
    seen = {}
    real_eval = sdrun.tools.bench.bench_eval

    def eval_then_kill(*args, **kwargs):
        seen["at eval"] = json.loads(out.read_text())
        raise Killed

    monkeypatch.setattr(sdrun.tools.bench, "bench_eval", eval_then_kill)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Killed):
            run_bench([*tiny, "--sections", "sd,eval", "--repeats", "2"])
        res = seen["at eval"]["results"]
        assert set(res) == {"sd"} and "partial" not in res["sd"]
        assert len(res["sd"]["runs"]["pL=0.5"]["step_s_all"]) == 2 and res["sd"]["ratio_sd_over_constant"] > 0
        monkeypatch.setattr(sdrun.tools.bench, "bench_eval", real_eval)

        # --speed: killed at the first step after the first timed repeat was saved.
        real_steps = Stepper.steps

        def steps_until_a_repeat_is_saved(self, n, batches=None):
            speed = json.loads(out.read_text())["results"].get("speed", {}) if out.exists() else {}
            if "runs" in speed:
                seen["after repeat"] = speed
                raise Killed
            return real_steps(self, n, batches)

        out.unlink()
        monkeypatch.setattr(Stepper, "steps", steps_until_a_repeat_is_saved)
        with pytest.raises(Killed):
            run_bench([*tiny, "--speed", "eager", "--repeats", "3"])
        speed = seen["after repeat"]
        assert speed["partial"] == "1 of 3 timed repeats"
        assert [len(r["step_s_all"]) for r in speed["runs"].values()] == [1, 1]
        eager = speed["modes"]["eager"]
        assert eager["images_per_s_pL=0.5"] > 0 and eager["projected_500_epochs_min_pL=0.5"] > 0
        assert set(speed["warmup_s"]) == {"eager pL=1.0", "eager pL=0.5"}
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]  # written by rename: no temp file left


# ---------------------------------------------------------------- the bench times what sdrun train trains

def build_differences(model_a, optimizer_a, model_b, optimizer_b) -> list[str]:
    """Where two builds differ: a module's type or settings (a shortcut's pooling, a block's
    survival probability), a parameter's or buffer's name, shape or initial value, an
    optimiser hyper-parameter. Empty when they are the same network and optimiser."""
    import torch

    def modules(model):
        return [(name, type(m).__name__, {k: v for k, v in vars(m).items()
                                          if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple))})
                for name, m in model.named_modules()]

    def hyper(optimizer):
        return [type(optimizer).__name__] + [{k: v for k, v in g.items() if k != "params"}
                                             for g in optimizer.param_groups]

    out = [f"module {a[0]}: {a[1:]} vs {b[1:]}" for a, b in zip(modules(model_a), modules(model_b)) if a != b]
    sa, sb = model_a.state_dict(), model_b.state_dict()
    if list(sa) != list(sb):
        out.append(f"state_dict names: {sorted(set(sa) ^ set(sb))}")
    out += [f"{k}: {'shape' if sa[k].shape != sb[k].shape else 'initial value'}"
            for k in sa if k in sb and not (sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]))]
    if hyper(optimizer_a) != hyper(optimizer_b):
        out.append(f"optimiser: {hyper(optimizer_a)} vs {hyper(optimizer_b)}")
    return out


def test_the_bench_times_the_network_optimiser_and_data_that_sdrun_train_builds():
    """For the same settings, the bench's Stepper (its options turned into overrides, --set
    included) and `sdrun train`'s build_run (sdrun.engine.setup) give the same composed config,
    modules, initial weights and buffers (one seed), optimiser settings, gates and first batch,
    for fidelity=reference (the default: subsampling shortcuts, gamma ~ U(0, 1)) and
    fidelity=paper (2x2 average pooling, gamma = 1). The control is the Stepper as it was
    before issue 22 (build_model's defaults, OptimConfig's SGD): this comparison finds it
    different from the run `sdrun train` trains, so the test can fail."""
    import torch
    from omegaconf import OmegaConf

    from sdrun.config import OptimConfig, to_plain
    from sdrun.engine.optim import make_optimizer
    from sdrun.engine.setup import build_run
    from sdrun.launch.compose import compose
    from sdrun.model.resnet import PadShortcut, build_model
    from sdrun.rng import seed_global
    from sdrun.tools.bench import config, parse
    from sdrun.tools.stepper import Stepper

    options = ["--depth", "8", "--batch-size", "16", "--device", "cpu"]
    train_keys = ["depth=8", "batch_size=16", "device=cpu", "pL=0.5"]  # `sdrun train depth=8 ...`
    for preset in ("reference", "paper"):
        bench = Stepper(config(parse(options + (["--set", "fidelity=paper"] if preset == "paper" else [])), pL=0.5))
        run = build_run(compose(*train_keys, *(["fidelity=paper"] if preset == "paper" else [])))
        assert to_plain(bench.cfg) == to_plain(run.cfg)
        assert build_differences(bench.model, bench.optimizer, run.model, run.state.optimizer) == []
        assert [bench.run.state.gates.draw() for _ in range(5)] == [run.state.gates.draw() for _ in range(5)]
        (bx, by), (rx, ry) = bench.next_batch(), next(iter(run.state.batches))
        assert torch.equal(bx, rx) and torch.equal(by, ry)
        assert bx.is_contiguous(memory_format=torch.channels_last)  # channels_last=auto: on, as in training

        pools = {m.pool for m in run.model.modules() if isinstance(m, PadShortcut)}
        gammas = torch.cat([m.weight.detach() for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
        if preset == "reference":
            assert pools == {"subsample"} and not torch.all(gammas == 1)
            # The control: the Stepper before issue 22, built as it was (same seed).
            seed_global(1)
            old = build_model("cifar_resnet", 8, 10, 0.5, "linear")
            found = build_differences(old, make_optimizer(old, OmegaConf.structured(OptimConfig)),
                                      run.model, run.state.optimizer)
            assert any(d.startswith("module blocks.") and "'avg'" in d and "'subsample'" in d for d in found), found
            assert "stem.1.weight: initial value" in found  # the stem's BatchNorm gamma: 1 there, U(0, 1) here
        else:
            assert pools == {"avg"} and torch.all(gammas == 1)
    # A section's own keys win over --set: the layout section still compares off with on.
    assert str(config(parse(options + ["--set", "channels_last=off"]), channels_last="on").channels_last) == "on"
