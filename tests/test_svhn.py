"""SVHN: torchvision's reader on real-format .mat files, the paper's validation split, step evaluations."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sdrun.data.readers import DataError, load_image_data
from tests.conftest import TINY, compose_cfg, read_jsonl, train_in_process, write_svhn_mats


def svhn_cfg(root, **kw):
    return OmegaConf.create({"name": "svhn", "root": str(root), "download": False, "check_md5": False,
                             "num_classes": 10, "val_per_class": [2, 1], **kw})


def per_class(split) -> list[int]:
    return torch.bincount(split.labels, minlength=10).tolist()


def from_file(split, source: int) -> torch.Tensor:
    return split.images[:, 0, 0, 1] == source  # the fixture writes the file index there


def test_splits_per_class_labels_and_layout(tmp_path):
    root = write_svhn_mats(tmp_path, per_class=(6, 4, 2))
    data = load_image_data(svhn_cfg(root), seed=1)
    assert per_class(data.val) == [3] * 10 and per_class(data.test) == [2] * 10
    assert per_class(data.train) == [(6 - 2) + (4 - 1)] * 10
    # validation: 2 per class from train, 1 per class from extra, none from test
    assert torch.bincount(data.val.labels[from_file(data.val, 0)], minlength=10).tolist() == [2] * 10
    assert torch.bincount(data.val.labels[from_file(data.val, 1)], minlength=10).tolist() == [1] * 10
    assert int(from_file(data.train, 2).sum()) == 0
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        # SVHN's label 10 is the digit 0; each label is the digit drawn in its own image
        assert split.labels.min() == 0 and split.labels.max() == 9
        assert torch.equal(split.images[:, 0, 0, 0].long(), split.labels)
        assert bool((split.images[:, 1, 1, 2] == 255).all())  # (H, W, C, N) became (N, C, H, W)
    # train and validation are disjoint: 70 + 30 distinct images out of the 100 of train + extra
    everything = torch.cat([data.train.images, data.val.images]).flatten(1)
    assert len(torch.unique(everything, dim=0)) == 100


def test_validation_draw_follows_the_seed(tmp_path):
    root = write_svhn_mats(tmp_path, per_class=(6, 4, 2))
    a, b, c = (load_image_data(svhn_cfg(root), seed=s).val.images for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_no_validation_and_too_few_images(tmp_path):
    root = write_svhn_mats(tmp_path, per_class=(3, 2, 1))
    data = load_image_data(svhn_cfg(root, val_per_class=[0, 0]), seed=1)
    assert data.val is None and len(data.train) == 50
    with pytest.raises(DataError, match="class 0 has 3 images, fewer than the 4"):
        load_image_data(svhn_cfg(root, val_per_class=[4, 0]), seed=1)


def test_missing_files_and_md5_are_data_errors(tmp_path):
    # (missing files through the CLI, one line and exit 2: a case in test_bad_input.py)
    with pytest.raises(DataError, match="train_32x32.mat, extra_32x32.mat, test_32x32.mat"):
        load_image_data(svhn_cfg(tmp_path / "nowhere"), seed=1)
    write_svhn_mats(tmp_path / "svhn", per_class=(3, 2, 1))
    with pytest.raises(DataError, match="not found or corrupt"):  # fixtures are not the official files
        load_image_data(svhn_cfg(tmp_path / "svhn", check_md5=True), seed=1)


def test_recipe_is_the_papers():
    cfg = compose_cfg("dataset=svhn")
    assert (cfg.depth, cfg.epochs, list(cfg.optim.milestones), cfg.optim.lr) == (152, 50, [30, 35], 0.1)
    assert cfg.eval_every_steps == 200 and list(cfg.dataset.val_per_class) == [400, 200]
    assert (cfg.dataset.translate, cfg.dataset.flip) == (0, False)


def test_tiny_run_with_step_evaluations(tmp_path):
    write_svhn_mats(tmp_path / "svhn", per_class=(6, 4, 2))
    args = [a for a in TINY if not a.startswith(("dataset=", "max_steps", "batch_size"))]
    run = tmp_path / "run"
    train_in_process(run, *args, "dataset=svhn", f"dataset.root={tmp_path / 'svhn'}", "dataset.check_md5=false",
                     "dataset.val_per_class=[2,1]", "batch_size=16", "eval_every_steps=2")
    metrics, evals = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "evals.jsonl")
    results = json.loads((run / "results.json").read_text())

    # 70 training images in batches of 16: 5 steps an epoch; every 2nd step plus each epoch end
    assert [m["step"] for m in metrics] == [5, 10] and [m["epoch"] for m in metrics] == [1, 2]
    assert [e["step"] for e in evals] == [2, 4, 5, 6, 8, 10]
    assert [e["epoch"] for e in evals] == [0.4, 0.8, 1, 1.2, 1.6, 2]
    # metrics.jsonl keeps its per-epoch keys; step evaluations live in evals.jsonl only
    assert {"epoch", "step", "lr", "train_loss", "train_error_pct", "val_error_pct", "test_error_pct",
            "epoch_train_time_s", "images_per_s", "active_blocks_mean"} <= set(metrics[0])
    assert "best_val_error_pct" not in metrics[0]

    # epoch ends: test always measured, same numbers as metrics.jsonl
    for m in metrics:
        e = next(e for e in evals if e["step"] == m["step"])
        assert (e["val_error_pct"], e["test_error_pct"]) == (m["val_error_pct"], m["test_error_pct"])
    # the selection is the first evaluation with the lowest validation error, at step granularity,
    # among the every-2-step evaluations only (select_from=steps, the reference's default): the
    # epoch end at step 5 is evaluated but cannot be selected
    candidates = [e for e in evals if e["step"] % 2 == 0]
    best = min(candidates, key=lambda e: e["val_error_pct"])
    assert results["best_val_step"] == best["step"] and results["best_val_epoch"] == best["epoch"]
    assert results["best_val_error_pct"] == best["val_error_pct"]
    assert results["test_error_at_best_val_pct"] == best["test_error_pct"] is not None
    for i, e in enumerate(candidates):  # test measured inside an epoch exactly when validation improved
        improved = e["val_error_pct"] < min([x["val_error_pct"] for x in candidates[:i]], default=float("inf"))
        at_epoch_end = e["step"] in (5, 10)
        assert (e["test_error_pct"] is not None) == (improved or at_epoch_end)
    assert next(e for e in evals if e["step"] == 5)["test_error_pct"] is not None  # epoch end: always
    assert results["dataset"] == "svhn" and results["num_blocks"] == 3

    by_step = EventAccumulator(str(run / "by_step"))  # step-axis curves have their own event file
    by_step.Reload()
    assert [s.step for s in by_step.Scalars("error_by_step/val")] == [2, 4, 5, 6, 8, 10]
    assert [s.value for s in by_step.Scalars("error_by_step/val")] == pytest.approx(
        [e["val_error_pct"] for e in evals])
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [s.step for s in acc.Scalars("error/val")] == [1, 2]  # per-epoch tags keep the epoch axis


def test_image_size_other_than_32_is_refused(tmp_path):
    root = write_svhn_mats(tmp_path, per_class=(3, 2, 1))
    with pytest.raises(DataError) as e:
        load_image_data(svhn_cfg(root, image_size=64), seed=1)
    assert str(e.value) == ("dataset.image_size=64: the SVHN files (*_32x32.mat) hold 32x32 images and are not "
                            "resized; use dataset.image_size=32")


def test_split_seed_fixes_the_per_class_draw(tmp_path):
    root = write_svhn_mats(tmp_path, per_class=(6, 4, 2))

    def val(seed, **kw):
        return load_image_data(svhn_cfg(root, **kw), seed=seed).val.images

    assert torch.equal(val(1, split_seed=3), val(2, split_seed=3))
    assert torch.equal(val(3), val(9, split_seed=3)) and not torch.equal(val(1), val(3))
