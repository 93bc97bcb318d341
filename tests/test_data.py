import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf

from sdrun.data.batches import Normalizer, TrainBatches, translate_and_flip
from sdrun.data.readers import DataError, Split, load_image_data, split_validation
from tests.conftest import write_cifar_pickles, write_image_folder


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
