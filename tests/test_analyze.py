"""sdrun analyze on tiny runs trained in process (sdrun.launch.app.train); the CLI's main() runs
`sdrun analyze` once (test_cli_compares_two_runs), in this process like the rest.

The exact-equality checks compare the analysis's gated networks with forwards written out
block by block: H = ReLU(shortcut(H) + s * branch(H)), s = 1 (gate open) or p_l (test rule).
"""

import json
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from sdrun import cli
from sdrun.tools.analyze import (SubnetworkEvaluator, analyze_run, doubling, load_trained_run, monte_carlo_ensemble,
                           own_bn_statistics)
from sdrun.engine.state import load_checkpoint, save_checkpoint
from sdrun.model.stochastic import GateSampler
from tests.conftest import TINY, sdrun_main, train_in_process, write_cifar_pickles

# ResNet-14: L = 6 blocks, two of them transitions (blocks 3 and 5), on 16 x 16 digits (a
# quarter of the 32 x 32 forwards' work: the analysis runs hundreds). fidelity=paper (gamma = 1):
# after these few steps the reference's U(0, 1) gammas left a net whose every lesion had the same
# test error (90.28 %), so the lesion checks could not tell blocks apart; the analysis itself
# does not depend on the init.
TRAIN = [*TINY, "depth=14", "checkpoint=true", "fidelity=paper", "dataset.image_size=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analyze")
    for name, pL in (("sd", "0.5"), ("const", "1.0")):
        train_in_process(root / name, *TRAIN, f"pL={pL}")
    return root


@pytest.fixture(scope="module")
def sd(runs):
    return load_trained_run(runs / "sd")


def by_hand(model, x, scales):
    """The forward written out: scale None = block removed (shortcut only)."""
    h = model.stem(x)
    for block, s in zip(model.blocks, scales):
        h = block.shortcut(h) if s is None else torch.relu(block.shortcut(h) + s * block.branch(h))
    return model.head(h)


@torch.inference_mode()
def test_every_gate_open_is_the_unscaled_network(sd):
    ev = SubnetworkEvaluator(sd.model, sd.test, sd.normalizer, batch_size=len(sd.test))
    (x,) = ev.batches
    L = len(sd.model.blocks)
    unscaled = by_hand(sd.model, x, [1.0] * L)
    assert torch.equal(ev.logits([True] * L), unscaled)
    assert not torch.equal(ev.logits(None), unscaled)  # p_l < 1: the test rule does scale


@torch.inference_mode()
def test_test_rule_is_shortcut_plus_p_times_branch(sd):
    ev = SubnetworkEvaluator(sd.model, sd.test, sd.normalizer, batch_size=len(sd.test))
    (x,) = ev.batches
    probs = sd.model.survival_probs
    assert probs == pytest.approx([1 - l / 6 * 0.5 for l in range(1, 7)])
    assert torch.equal(ev.logits(None), by_hand(sd.model, x, probs))


@torch.inference_mode()
def test_lesion_is_a_forward_with_that_gate_closed(sd):
    ev = SubnetworkEvaluator(sd.model, sd.test, sd.normalizer, batch_size=100)  # 4 batches, the last one short
    L = len(sd.model.blocks)
    lesions = ev.lesion_logits(range(L))
    (x,) = SubnetworkEvaluator(sd.model, sd.test, sd.normalizer, batch_size=len(sd.test)).batches
    for b in range(L):
        gates = [None] * L
        gates[b] = False
        assert torch.equal(lesions[b], ev.logits(gates)), b
        scales = list(sd.model.survival_probs)
        scales[b] = None
        assert torch.allclose(lesions[b], by_hand(sd.model, x, scales), atol=1e-5), b
    assert len({ev.error_pct(v) for v in lesions.values()}) > 1  # lesions differ from one another


@torch.inference_mode()
def test_monte_carlo_ensemble_averages_softmax_of_sampled_subnetworks(sd):
    ev = SubnetworkEvaluator(sd.model, sd.test, sd.normalizer, batch_size=500)
    out = monte_carlo_ensemble(ev, sd.model.survival_probs, k_max=5, seed=123)
    assert [p["k"] for p in out["ensemble"]] == [1, 2, 4, 5] == doubling(5)
    sampler = GateSampler(sd.model.survival_probs, 123)
    gates = [sampler.draw() for _ in range(5)]
    probs = [ev.logits(g).softmax(1) for g in gates]
    assert [s["active_blocks"] for s in out["subnetworks"]["samples"]] == [sum(g) for g in gates]
    assert [s["error_pct"] for s in out["subnetworks"]["samples"]] == [ev.error_pct(p) for p in probs]
    for point in out["ensemble"]:
        assert point["error_pct"] == ev.error_pct(sum(probs[:point["k"]]))
    assert out["ensemble"][0]["error_pct"] == out["subnetworks"]["samples"][0]["error_pct"]


def test_own_bn_statistics_are_the_subnetworks_and_are_restored(sd):
    model = sd.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = SubnetworkEvaluator(model, sd.train, sd.normalizer, batch_size=64)
    batches = ev.batches[:3]  # equal sizes: the average of batch means is the mean over all images
    gates = [True, False, True, True, False, True]
    with own_bn_statistics(model, batches, gates):
        assert not model.training
        with torch.no_grad():
            stem_out = model.stem[0](torch.cat(batches))
        stem_bn = model.stem[1]
        assert torch.allclose(stem_bn.running_mean, stem_out.mean((0, 2, 3)), atol=1e-5)
        # A removed block's BN never ran: its statistics are the reset ones.
        dropped_bn = model.blocks[1].branch[1]
        assert torch.equal(dropped_bn.running_mean, torch.zeros_like(dropped_bn.running_mean))
        inside = ev.logits(gates)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(inside, ev.logits(gates))  # own statistics did change the sub-network


def test_constant_depth_has_one_subnetwork(runs):
    r = analyze_run(load_trained_run(runs / "const"), k_max=4, lesion=[], removal_draws=0)
    assert r["all_open_error_pct"] == r["test_rule_error_pct"]
    assert {p["error_pct"] for p in r["ensemble"]} == {r["test_rule_error_pct"]}
    assert r["subnetworks"]["error_pct_std"] == 0.0 and r["subnetworks"]["active_blocks_mean"] == 6


def test_same_seed_same_numbers(sd):
    def numbers(seed):
        r = analyze_run(sd, k_max=4, lesion=[0], removal_draws=2, seed=seed, test_images=200)
        return {k: v for k, v in r.items() if k != "seconds"}
    a = numbers(7)
    assert a == numbers(7)
    b = numbers(8)
    assert a["test_images"] == 200 and (a["subnetworks"] != b["subnetworks"] or a["removal"] != b["removal"])


def test_cli_compares_two_runs(runs):
    r = sdrun_main("analyze", "sd", "--compare", "const", "--k-max", "4", "--lesion", "1,3-4",
                   "--removal-draws", "2", "--bn-recompute", "64", "--out", "out", cwd=runs)
    assert r.returncode == 0, r.stderr
    out = runs / "out"
    data = json.loads((out / "analysis.json").read_text())
    sd, const = data["runs"]
    assert (sd["pL"], const["pL"]) == (0.5, 1.0)
    for res in (sd, const):
        assert [x["block"] for x in res["lesion"]] == [1, 3, 4]
        assert [x["transition"] for x in res["lesion"]] == [False, True, False]
        assert [x["num_removed"] for x in res["removal"]] == [1, 2, 4, 6]
        assert [x["draws"] for x in res["removal"]] == [2, 2, 2, 1]
        assert [p["k"] for p in res["ensemble"]] == [1, 2, 4]
        assert "running statistics" in res["bn_statistics"]
        own = res["bn_recomputed"]
        assert own["train_images"] == 64 and [p["k"] for p in own["ensemble"]] == [1, 2, 4]
        # The same gate draws with and without recomputed statistics.
        assert [s["active_blocks"] for s in own["subnetworks"]["samples"]] == \
            [s["active_blocks"] for s in res["subnetworks"]["samples"]]
    # The test rule on the final checkpoint is the trainer's own final test evaluation.
    for name, res in (("sd", sd), ("const", const)):
        trained = json.loads((runs / name / "results.json").read_text())
        assert res["test_rule_error_pct"] == trained["final_test_error_pct"]
    assert f"{sd['test_rule_error_pct']:.2f}" in r.stdout and "block 3 removed (transition)" in r.stdout
    assert (out / "report.txt").read_text() in r.stdout
    for plot in ("ensemble.png", "lesion.png", "removal.png"):
        assert imread(out / plot).shape[0] > 100, plot


@pytest.mark.parametrize("args,expected", [
    (["nowhere"], "run directory nowhere does not exist"),
    (["empty"], "no checkpoint at empty/checkpoint.pt"),
    (["sd", "--checkpoint", "empty/junk.pt"], "empty/junk.pt is not a readable checkpoint"),
    (["sd", "--lesion", "2,9"], "--lesion blocks must lie in 1..6"),
    (["sd", "--lesion", "x"], "--lesion"),
    (["sd", "--k-max", "0"], "--k-max"),
    (["sd", "--device", "tpu"], "device='tpu' must be auto, cpu, cuda or cuda:N"),
])
def test_bad_input_gives_one_line_error(runs, args, expected, monkeypatch, capsys):
    # In process (the same main() the console script calls): each case would otherwise pay
    # a subprocess's torch import; test_cli_compares_two_runs covers the real script.
    monkeypatch.chdir(runs)
    (runs / "empty").mkdir(exist_ok=True)
    (runs / "empty" / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["analyze", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sdrun analyze: error:") and expected in err, err
    assert not (runs / args[0] / "analysis").exists()


def test_data_root_points_at_a_moved_dataset(runs, monkeypatch, capsys):
    """A run trained on CIFAR-10 whose data moved: a one-line error, then --data-root."""
    monkeypatch.chdir(runs)
    state = load_checkpoint(runs / "sd" / "checkpoint.pt")
    state["config"]["dataset"].update(name="cifar10", root="moved-away", format="pickle", check_md5=False,
                                      val_size=50, image_size=32)
    # CIFAR's 32 x 32 images (this run was trained on 16 x 16 digits): a mean image of their size
    state["normalizer"]["mean"] = torch.nn.functional.interpolate(state["normalizer"]["mean"][None], size=32)[0]
    (runs / "c10run").mkdir(exist_ok=True)
    save_checkpoint(runs / "c10run" / "checkpoint.pt", state)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["analyze", "c10run"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "moved-away" in err and "--data-root" in err
    write_cifar_pickles(runs / "c10", test=30)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["analyze", "c10run", "--data-root", "c10", "--k-max", "2", "--lesion", "none",
                  "--removal-draws", "0"])
    assert exit_.value.code == 0, capsys.readouterr().err
    (res,) = json.loads((runs / "c10run" / "analysis" / "analysis.json").read_text())["runs"]
    assert res["dataset"] == "cifar10" and res["test_images"] == 30 and res["lesion"] == [] == res["removal"]
