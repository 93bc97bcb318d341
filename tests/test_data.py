import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf

from sdrun.data.batches import Normalizer, TrainBatches, translate_and_flip
from sdrun.data.readers import DataError, Split, find_data, load_image_data, split_validation
from sdrun.rng import cpu_generator
from tests.conftest import write_cifar_pickles, write_image_folder, write_imagenet_folder


def ds_cfg(**kw):
    base = dict(name="cifar10", root="", format="auto", download=False, check_md5=False, num_classes=10,
                image_size=32, val_size=0, translate=4, flip=True)
    return OmegaConf.create({**base, **kw})


def test_cifar10_pickle_batches(tmp_path):
    root = write_cifar_pickles(tmp_path, per_batch=20, test=30)
    data = load_image_data(ds_cfg(root=str(root), val_size=10), seed=1)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 30)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    assert data.classes == [f"c{i}" for i in range(10)]


def test_cifar100_pickle_batches(tmp_path):
    root = write_cifar_pickles(tmp_path, num_classes=100, per_batch=20, test=30)
    data = load_image_data(ds_cfg(name="cifar100", root=str(root), num_classes=100, val_size=25), seed=1)
    assert (len(data.train), len(data.val), len(data.test)) == (75, 25, 30)
    assert int(data.train.labels.max()) < 100


def test_md5_check_is_on_by_default_and_names_the_files(tmp_path):
    root = write_cifar_pickles(tmp_path)
    with pytest.raises(DataError, match="data_batch_1"):
        load_image_data(ds_cfg(root=str(root), check_md5=True), seed=1)


def test_missing_dataset_names_the_expected_path(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_image_data(ds_cfg(root=str(tmp_path / "nowhere")), seed=1)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_image_folder_layout(tmp_path, ext):
    root = write_image_folder(tmp_path, classes=[f"k{i}" for i in range(10)], per_class=(4, 2), ext=ext)
    data = load_image_data(ds_cfg(root=str(root), val_size=8), seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (32, 8, 20)
    assert data.classes == [f"k{i}" for i in range(10)]
    assert sorted(data.test.labels.tolist()) == sorted(list(range(10)) * 2)


def test_validation_split_is_seeded_and_disjoint():
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    s = Split(x, torch.arange(100))
    tr, va = split_validation(s, 20, seed=5)
    tr2, va2 = split_validation(s, 20, seed=5)
    _, va3 = split_validation(s, 20, seed=6)
    assert len(tr) == 80 and len(va) == 20
    assert set(tr.labels.tolist()).isdisjoint(va.labels.tolist())
    assert torch.equal(va.labels, va2.labels) and not torch.equal(va.labels, va3.labels)
    with pytest.raises(DataError):
        split_validation(s, 100, seed=0)


def test_digits_are_brought_to_cifar_shape():
    data = load_image_data(ds_cfg(name="digits", val_size=200), seed=1)
    assert (len(data.train), len(data.val), len(data.test)) == (1237, 200, 360)
    assert data.train.images.shape[1:] == (3, 32, 32) and data.train.images.dtype == torch.uint8
    assert set(data.test.labels.tolist()) == set(range(10))


def test_digits_are_read_as_scikit_learn_loads_them():
    from sklearn.datasets import load_digits

    from sdrun.data.readers import _read_digits

    pixels, labels = _read_digits()
    reference = load_digits()
    assert np.array_equal(pixels, reference.data) and np.array_equal(labels, reference.target)


def test_normalizer_uses_mean_image_and_one_global_std():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    norm = Normalizer.fit(x, chunk=7)
    mean = x.double().mean(0)
    assert torch.allclose(norm.mean.double(), mean, atol=1e-4)
    assert norm.std == pytest.approx((x.double() - mean).std(unbiased=False).item(), rel=1e-6)
    z = norm(x)
    assert abs(z.mean().item()) < 1e-5 and z.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)


def test_translate_and_flip_match_torchvision_crop_and_flip():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    dy, dx = torch.tensor([-4, 0, 3, 4, -2, 1]), torch.tensor([4, 0, -3, -4, 2, 0])
    flip = torch.tensor([True, False, True, False, True, True])
    out = translate_and_flip(x, dy, dx, flip, pad=4)
    for i in range(6):
        # torchvision: pad with zeros, crop at (4+dy, 4+dx), then flip horizontally.
        ref = TF.crop(TF.pad(x[i], [4, 4, 4, 4], fill=0), int(4 + dy[i]), int(4 + dx[i]), 8, 8)
        if flip[i]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out[i], ref), i


def test_train_batches_cover_the_split_once_per_epoch_and_are_seeded():
    x = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)
    s = Split(x, torch.arange(70))
    norm = Normalizer.fit(x)
    a = TrainBatches(s, norm, batch_size=32, translate=2, flip=True, seed=3)
    b = TrainBatches(s, norm, batch_size=32, translate=2, flip=True, seed=3)
    assert len(a) == 3  # the last, smaller batch is kept
    epoch_a = list(a)
    assert sorted(torch.cat([y for _, y in epoch_a]).tolist()) == list(range(70))
    for (xa, la), (xb, lb) in zip(epoch_a, b):  # same seed, same batches
        assert torch.equal(xa, xb) and torch.equal(la, lb)
    assert not torch.equal(next(iter(a))[1], epoch_a[0][1])  # the next epoch is reshuffled
    capped = TrainBatches(s, norm, batch_size=32, translate=2, flip=True, seed=3, max_steps=1)
    assert len(list(capped)) == 1


def test_unreadable_images_are_counted_by_the_reader_and_found_by_the_preflight_sample(tmp_path):
    root = write_image_folder(tmp_path, classes=[f"k{i}" for i in range(10)], per_class=(4, 2))
    png = (root / "train" / "k0" / "0000.png").read_bytes()
    # a corrupt chunk (its checksum fails: PIL raises SyntaxError) and a truncated file
    (root / "train" / "k0" / "0000.png").write_bytes(png[:40] + bytes(b ^ 0xFF for b in png[40:60]) + png[60:])
    (root / "test" / "k9" / "0001.png").write_bytes(png[:len(png) // 2])
    with pytest.raises(DataError) as e:
        load_image_data(ds_cfg(root=str(root)), seed=1)
    assert str(e.value).startswith(f"dataset.root={root}: 2 of 60 image files cannot be read as images, the first: "
                                   f"{root}/train/k0/0000.png (")
    # the pre-flight opens 3 files per class folder (0000.png of train/k0 is one: the folder holds 4)
    problem = find_data(ds_cfg(root=str(root), format="imagefolder"))
    assert problem.startswith(f"dataset.root={root}: ") and " of the 50 image files sampled (3 per class folder) " \
        "cannot be read as images, the first: " in problem, problem


def test_image_size_is_refused_where_the_files_hold_32x32_images(tmp_path):
    root = write_cifar_pickles(tmp_path / "c10")
    expected = ("dataset.image_size=64: the CIFAR-10 pickle batches hold 32x32 images and are not resized; "
                "use dataset.image_size=32, or dataset.format=imagefolder with 64x64 images")
    with pytest.raises(DataError) as e:
        load_image_data(ds_cfg(root=str(root), image_size=64), seed=1)  # format=auto: found to be pickle
    assert str(e.value) == expected
    assert find_data(ds_cfg(root=str(root), image_size=64)) == expected  # a sweep's pre-flight refuses it too
    # image folders (of images that size) and the digits honour it
    folder = write_image_folder(tmp_path / "png", classes=[f"k{i}" for i in range(10)], per_class=(2, 1), size=64)
    assert load_image_data(ds_cfg(root=str(folder), image_size=64), seed=1).train.images.shape[1:] == (3, 64, 64)
    assert load_image_data(ds_cfg(name="digits", image_size=16), seed=1).test.images.shape[1:] == (3, 16, 16)


def test_split_seed_fixes_the_validation_split_across_run_seeds(tmp_path):
    root = write_cifar_pickles(tmp_path, per_batch=20, test=30)  # 100 distinct training images

    def val(seed, **kw):
        return load_image_data(ds_cfg(root=str(root), val_size=10, **kw), seed=seed).val.images

    assert torch.equal(val(1, split_seed=1), val(2, split_seed=1))
    assert not torch.equal(val(1), val(2))
    assert torch.equal(val(2, split_seed=None), val(7, split_seed=2))
    # unset: the draw of the "split" stream of the run's seed, as before split_seed existed
    train = load_image_data(ds_cfg(root=str(root)), seed=0).train
    held_out = torch.randperm(100, generator=cpu_generator(2, "split"))[:10].sort().values
    assert torch.equal(val(2), train.images[held_out])


def test_imagenet_held_out_split_follows_split_seed(tmp_path):
    from sdrun.data.imagenet import load_imagenet

    root = write_imagenet_folder(tmp_path, per_class=(5, 1))

    def held_out(seed, split_seed=None) -> list[int]:
        cfg = OmegaConf.create({"seed": seed, "batch_size": 4, "eval_batch_size": 4, "num_workers": 0,
                                "max_steps_per_epoch": None,
                                "dataset": {"root": str(root), "num_classes": 3, "image_size": 32, "resize_size": 36,
                                            "val_size": 4, "split_seed": split_seed, "flip": True,
                                            "color_jitter": 0.0, "lighting": 0.0}})
        return load_imagenet(cfg, torch.device("cpu")).val.indices

    assert held_out(1, split_seed=5) == held_out(2, split_seed=5)
    assert held_out(5) == torch.randperm(15, generator=cpu_generator(5, "split"))[:4].sort().values.tolist()
    assert held_out(1) != held_out(5)
