"""ImageNet: torchvision-layout ResNets with stochastic depth, the ImageFolder pipeline, a tiny real run."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sdrun.config import validate
from sdrun.data.readers import DataError
from sdrun.ranks import SINGLE, Context
from sdrun.data.imagenet import load_imagenet
from sdrun.tools import analyze
from sdrun.engine.state import load_checkpoint
from sdrun.model.resnet import ImageNetResNet, build_model
from sdrun.model.stochastic import survival_probs
from sdrun.engine.schedule import lr_at
from tests.conftest import compose_cfg, read_jsonl, train_in_process, write_imagenet_folder


def test_resnet152_parameters_and_blocks():
    model = build_model("imagenet_resnet", 152, 1000, 0.5, "linear")
    assert sum(p.numel() for p in model.parameters()) == 60_192_808  # torchvision's resnet152: 60.19 M
    assert len(model.blocks) == 50
    assert model.survival_probs == pytest.approx(survival_probs(50, 0.5, "linear"))
    assert model.survival_probs[-1] == 0.5
    projections = [i for i, b in enumerate(model.blocks) if not isinstance(b.shortcut, torch.nn.Identity)]
    assert projections == [0, 3, 11, 47]  # the first block of each of the stages [3, 8, 36, 3]


@pytest.mark.parametrize("depth", [18, 50])
def test_same_function_as_torchvision(depth):
    """Copy torchvision's weights in (state dicts line up entry by entry): with p_L = 1 the
    test-time network is torchvision's resnetN, output for output."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(num_classes=10).eval()
    ours = ImageNetResNet(depth, num_classes=10, p_last=1.0).eval()
    theirs, mine = reference.state_dict(), ours.state_dict()
    assert [v.shape for v in theirs.values()] == [v.shape for v in mine.values()]
    ours.load_state_dict(dict(zip(mine, theirs.values())))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


def test_resnet152_forward_backward_and_dropped_blocks_do_no_work():
    torch.manual_seed(0)
    model = ImageNetResNet(152, num_classes=1000, p_last=0.5).train()
    dropped = {3, 5, 20, 47, 49}  # two projection blocks (3, 47) among them
    gates = [i not in dropped for i in range(50)]
    calls = []
    for i, block in enumerate(model.blocks):
        block.branch.register_forward_hook(lambda *_, i=i: calls.append(i))
    bn_before = {i: model.blocks[i].branch[1].running_mean.clone() for i in dropped}
    out = model(torch.randn(2, 3, 64, 64), gates)
    assert out.shape == (2, 1000)
    out.logsumexp(1).sum().backward()
    assert sorted(set(range(50)) - set(calls)) == sorted(dropped)  # branches of dropped blocks never ran
    for i, block in enumerate(model.blocks):
        grads = [p.grad for p in block.branch.parameters()]
        if i in dropped:
            assert all(g is None for g in grads)
            assert torch.equal(block.branch[1].running_mean, bn_before[i])
        else:
            assert all(g is not None for g in grads)
    # a dropped projection block still applies the ReLU after its (conv + BN) shortcut
    feats = {}
    model.blocks[47].register_forward_hook(lambda m, inp, o: feats.update(out=o))
    model.blocks[47].shortcut.register_forward_hook(lambda m, inp, o: feats.update(short=o.clone()))
    model(torch.randn(2, 3, 64, 64), gates)
    assert feats["out"].min() >= 0 and feats["short"].min() < 0
    assert torch.equal(feats["out"], feats["short"].clamp(min=0))


def cfg_for(root, **kw):
    base = {"seed": 1, "batch_size": 4, "eval_batch_size": 8, "num_workers": 0, "max_steps_per_epoch": None,
            "dataset": {"root": str(root), "num_classes": 3, "image_size": 32, "resize_size": 36,
                        "val_size": 0, "flip": True, "color_jitter": 0.4, "lighting": 0.1}}
    return OmegaConf.merge(base, kw)


def test_imagefolder_pipeline_shapes_splits_and_reproducible_order(tmp_path):
    root = write_imagenet_folder(tmp_path, per_class=(5, 2))
    data = load_imagenet(cfg_for(root, num_workers=1), torch.device("cpu"))
    assert (len(data.train), data.val, len(data.test)) == (15, None, 6)
    assert data.classes == ["n01440764", "n01443537", "n01484850"] and data.eval_sets["val"] is None
    first = list(data.train_batches)
    assert [len(y) for _, y in first] == [4, 4, 4, 3]
    x, _ = first[0]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
    test_x = torch.cat([x for x, _ in data.eval_sets["test"]()])
    assert test_x.shape == (6, 3, 32, 32)
    # same seed, same batches; the generator state at an epoch boundary restores the epoch
    again = load_imagenet(cfg_for(root, num_workers=1), torch.device("cpu"))
    state = again.train_batches.state_dict()
    replay = list(again.train_batches)
    assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(first, replay))
    second = list(again.train_batches)
    again.train_batches.load_state_dict(state)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(list(again.train_batches), first))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, second))
    # evaluation crops are deterministic
    assert torch.equal(test_x, torch.cat([x for x, _ in again.eval_sets["test"]()]))


def test_held_out_validation_from_train(tmp_path):
    root = write_imagenet_folder(tmp_path, per_class=(5, 2))
    data = load_imagenet(cfg_for(root, dataset={"val_size": 4}), torch.device("cpu"))
    assert (len(data.train), len(data.val), len(data.test)) == (11, 4, 6)
    train_files = {data.train.dataset.samples[i][0] for i in data.train.indices}
    val_files = {data.val.dataset.samples[i][0] for i in data.val.indices}
    assert not train_files & val_files and len(train_files | val_files) == 15
    x, _ = next(iter(data.eval_sets["val"]()))
    assert x.shape == (4, 3, 32, 32)


def test_bad_trees_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="train/<wnid>/"):
        load_imagenet(cfg_for(tmp_path / "nowhere"), torch.device("cpu"))
    root = write_imagenet_folder(tmp_path / "a", per_class=(2, 1))
    with pytest.raises(DataError, match="3 classes under .* but dataset.num_classes=1000"):
        load_imagenet(cfg_for(root, dataset={"num_classes": 1000}), torch.device("cpu"))
    (root / "val" / "n01440764").rename(root / "val" / "n00000000")
    with pytest.raises(DataError, match="different class folders"):
        load_imagenet(cfg_for(root), torch.device("cpu"))


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_a_data_error_naming_the_file(tmp_path, workers):
    root = write_imagenet_folder(tmp_path, per_class=(2, 1))
    (root / "train" / "n01443537" / "broken.JPEG").write_bytes(b"not a jpeg")
    data = load_imagenet(cfg_for(root, num_workers=workers), torch.device("cpu"))
    with pytest.raises(DataError, match="broken.JPEG") as e:
        list(data.train_batches)
    assert "\n" not in str(e.value)


def test_recipe_and_120_epoch_variant():
    cfg = compose_cfg("dataset=imagenet", "epochs=120")
    validate(cfg)
    assert (cfg.model.arch, cfg.depth, cfg.batch_size, cfg.optim.lr, cfg.optim.nesterov) == \
        ("imagenet_resnet", 152, 128, 0.1, True)
    lrs = [lr_at(e, cfg.optim) for e in (0, 29, 30, 60, 89, 90, 119)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])
    # (dataset=imagenet depth=110 through the CLI: a case in test_bad_input.py)


def test_tiny_run(tmp_path, capsys):
    write_imagenet_folder(tmp_path / "imagenet", per_class=(5, 2))
    run = tmp_path / "run"
    results = train_in_process(run, "dataset=imagenet", f"dataset.root={tmp_path / 'imagenet'}",
                               "dataset.num_classes=3", "dataset.image_size=32", "dataset.resize_size=36",
                               "dataset.val_size=3", "depth=18", "epochs=2", "optim.milestones=[]", "batch_size=4", "eval_batch_size=4",
                               "num_workers=1", "checkpoint=true")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [3, 6]  # 12 training images in batches of 4
    for m in metrics:
        assert 0 <= m["test_top5_error_pct"] <= m["test_error_pct"] <= 100
        assert 0 <= m["val_top5_error_pct"] <= m["val_error_pct"] <= 100
    assert results == json.loads((run / "results.json").read_text())
    best = min(metrics, key=lambda m: m["val_error_pct"])
    assert results["selection"] == "best_val" and results["best_val_epoch"] == best["epoch"]
    assert results["test_error_at_best_val_pct"] == best["test_error_pct"]
    assert results["test_top5_error_at_best_val_pct"] == best["test_top5_error_pct"]
    # fb.resnet.torch's "best top1": the lowest test error of any epoch end, the first on a tie
    lowest = min(metrics, key=lambda m: m["test_error_pct"])
    assert (results["best_test_error_pct"], results["best_test_epoch"]) == (lowest["test_error_pct"], lowest["epoch"])
    assert results["num_blocks"] == 8 and results["dataset"] == "imagenet"
    acc = EventAccumulator(str(run))
    acc.Reload()
    for tag in ("error/test", "error/test_top5", "error/val_top5", "depth/active_blocks_mean"):
        assert [s.step for s in acc.Scalars(tag)] == [1, 2], tag
    # sdrun analyze refuses an ImageNet run with the reason, on one line, exit 2 (in-process).
    assert analyze.main([str(run), "--out", str(tmp_path / "analysis")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdrun analyze: error: ") and "\n" not in err
    assert "holds a run on imagenet; sdrun analyze works on runs of the 32x32 datasets" in err
    assert not (tmp_path / "analysis").exists()


def test_best_over_epochs_is_the_first_lowest_and_survives_a_resume():
    """fb.resnet.torch's main.lua: `if testTop1 < bestTop1 then bestTop1 = testTop1`, printed at the end."""
    from sdrun.engine.loop import LowestTest

    best = {}
    lowest = LowestTest(best, resumed=False)
    for epoch, err in enumerate((30.0, 25.0, 27.0, 25.0), start=1):
        lowest.see(err, epoch)
    assert lowest.results() == {"best_test_error_pct": 25.0, "best_test_epoch": 2}  # the first of the tie
    again = LowestTest(best, resumed=True)  # resumed from its checkpoint (best is checkpointed)
    again.see(26.0, 5)
    again.see(24.5, 6)
    assert again.results() == {"best_test_error_pct": 24.5, "best_test_epoch": 6}
    # resumed from a checkpoint written before sdrun kept it: the earlier epochs are unknown, so None
    older = LowestTest({"val_error_pct": None, "epoch": 3}, resumed=True)
    older.see(20.0, 4)
    assert older.results() == {"best_test_error_pct": None, "best_test_epoch": None}


def test_global_batches_are_split_across_ranks_without_overlap():
    """Under torchrun each rank loads its part of the same global batch (batch_size is global)."""
    from sdrun.ranks import Context
    from sdrun.data.imagenet import GlobalBatchSampler
    from sdrun.rng import cpu_generator

    single = list(GlobalBatchSampler(23, 8, cpu_generator(1, "data")))
    parts = [list(GlobalBatchSampler(23, 8, cpu_generator(1, "data"), Context(r, 3))) for r in range(3)]
    assert [len(b) for b in single] == [8, 8, 7]
    for step, batch in enumerate(single):
        assert sum((p[step] for p in parts), []) == batch  # ranks' parts, in rank order, are the batch
    assert [len(p[0]) for p in parts] == [3, 3, 2]


def test_tiny_imagenet_run_under_torchrun_in_one_process(tmp_path):
    """ImageNet through the real console script under torchrun. One process is a distributed run
    of one (DDP, collectives, sharded evaluation; NCCL and SyncBatchNorm on a GPU: tests/test_cuda.py),
    not a silent fallback to the plain loop. Two ranks, their default run directory and the sum
    of their evaluation counts: tests/test_distributed.py; ImageNet's shards, here in process."""
    from tests.test_distributed import torchrun

    # 18 training images in global batches of 6 (at 32 px ResNet-18 ends at 1x1, and BatchNorm
    # needs more than one value per channel, so no rank may get a batch of 1); val/ has 3 x 5.
    write_imagenet_folder(tmp_path / "imagenet", per_class=(6, 5))
    args = ["dataset=imagenet", f"dataset.root={tmp_path / 'imagenet'}", "dataset.num_classes=3",
            "dataset.image_size=32", "dataset.resize_size=36", "depth=18", "epochs=2", "optim.milestones=[]", "batch_size=6",
            "eval_batch_size=4", "num_workers=0"]
    r = torchrun("--no-python", str(Path(sys.executable).with_name("sdrun")), "train", *args, cwd=tmp_path, nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "results.json").is_file() and (run_dir / ".hydra").is_dir()
    assert "distributed: 1 processes" in (run_dir / "train.log").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 1 and results["status"] == "finished"
    train_in_process(tmp_path / "single", *args)
    ddp, single = (read_jsonl(d / "metrics.jsonl") for d in (run_dir, tmp_path / "single"))
    assert [m["step"] for m in ddp] == [m["step"] for m in single] == [3, 6]
    # No validation set (ImageNet's default): the headline is the last epoch's test error, and
    # results.json also holds the lowest over the epochs, what fb.resnet.torch prints.
    lowest = min(ddp, key=lambda m: m["test_error_pct"])
    assert results["selection"] == "last_epoch" and results["test_error_at_best_val_pct"] == ddp[-1]["test_error_pct"]
    assert (results["best_test_error_pct"], results["best_test_epoch"]) == (lowest["test_error_pct"], lowest["epoch"])

    # The run's test error is its final model's error on the whole val/ folder, measured here;
    # and two ranks' shards of val/ split it: their counts add up to the whole's.
    cfg = compose_cfg(*args)
    model = build_model("imagenet_resnet", 18, 3, cfg.pL, "linear")
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["model"])
    model.eval()

    def wrong_of(ctx) -> tuple[int, int]:
        batches = list(load_imagenet(cfg, torch.device("cpu"), ctx=ctx).eval_sets["test"]())
        with torch.inference_mode():
            wrong = sum(int((model(x).argmax(1) != y).sum()) for x, y in batches)
        return wrong, sum(len(y) for _, y in batches)

    (wrong, images), parts = wrong_of(SINGLE), [wrong_of(Context(r, 2)) for r in (0, 1)]
    assert ddp[-1]["test_error_pct"] == pytest.approx(100.0 * wrong / images, abs=1e-9)
    assert [n for _, n in parts] == [8, 7] and tuple(map(sum, zip(*parts))) == (wrong, images)
