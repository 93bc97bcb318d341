"""The two data paths: device-resident batched augmentation vs DataLoader + torchvision transforms."""

import json

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from sdrun.data.build import make_train_batches
from sdrun.data.loader import DataLoaderBatches
from sdrun.data.batches import Normalizer, TrainBatches, translate_and_flip
from sdrun.data.readers import Split
from tests.conftest import TINY, train_in_process

PAD = 4


def both_paths(split, normalizer, **kw):
    args = dict(batch_size=32, translate=PAD, flip=True, seed=3) | kw
    return TrainBatches(split, normalizer, **args), DataLoaderBatches(split, normalizer, **args)


def random_split(n=70, size=8):
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n))


def test_without_augmentation_both_paths_yield_identical_batches():
    split = random_split()
    device, loader = both_paths(split, Normalizer.fit(split.images), translate=0, flip=False)
    assert len(device) == len(loader) == 3
    for epoch in range(3):  # the order stays in step across epochs
        pairs = list(zip(device, loader, strict=True))
        for (xd, yd), (xl, yl) in pairs:
            assert torch.equal(yd, yl), epoch
            assert torch.equal(xd, xl), epoch


def test_with_augmentation_both_paths_see_the_same_images_in_the_same_batches():
    split = random_split()
    device, loader = both_paths(split, Normalizer.fit(split.images))
    for _ in range(2):
        labels = [(yd, yl) for (_, yd), (_, yl) in zip(device, loader, strict=True)]
        assert all(torch.equal(yd, yl) for yd, yl in labels)


def coordinate_image(size=8):
    """Every pixel holds a distinct value 1..C*H*W, so a crop and flip can be read back."""
    return (torch.arange(3 * size * size) + 1).view(3, size, size)


def read_back_params(outputs: torch.Tensor, source: torch.Tensor) -> list[tuple[int, int, bool]]:
    """(dy, dx, flip) of each output, found by matching every candidate translate_and_flip exactly."""
    cands = [(dy, dx, f) for dy in range(-PAD, PAD + 1) for dx in range(-PAD, PAD + 1) for f in (False, True)]
    n = len(cands)
    table = translate_and_flip(source.float().expand(n, -1, -1, -1), torch.tensor([c[0] for c in cands]),
                               torch.tensor([c[1] for c in cands]), torch.tensor([c[2] for c in cands]), PAD)
    found = []
    for out in outputs:
        hits = (table == out).flatten(1).all(1).nonzero().flatten().tolist()
        assert len(hits) == 1, "output is not a +-4 px zero-filled translation (and flip) of the input"
        found.append(cands[hits[0]])
    return found


def test_both_paths_draw_crops_and_flips_from_the_same_distribution():
    """Each path's images are exact translate_and_flip outputs; offsets and flips are uniform, alike."""
    n = 2430  # 30 per offset pair
    source = coordinate_image()
    split = Split(source.to(torch.uint8).expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.int64))
    identity = Normalizer(torch.zeros(3, 8, 8), 1.0)  # keeps the pixel values readable
    device, loader = both_paths(split, identity, batch_size=512)
    params = {name: read_back_params(torch.cat([x for x, _ in path]), source)
              for name, path in (("device", device), ("dataloader", loader))}
    for name, p in params.items():
        dy, dx, flip = zip(*p)
        assert sorted(set(dy)) == sorted(set(dx)) == list(range(-PAD, PAD + 1)), name
        for values in (dy, dx, flip):  # uniform over -4..4, and over {no flip, flip}
            counts = torch.bincount(torch.tensor(values, dtype=torch.int64) - int(min(values))).tolist()
            assert len(counts) in (2, 2 * PAD + 1) and chisquare(counts).pvalue > 1e-3, (name, counts)
    joint = {name: torch.bincount(torch.tensor([(dy + PAD) * 18 + (dx + PAD) * 2 + f for dy, dx, f in p]),
                                  minlength=162) for name, p in params.items()}
    # The two samples are homogeneous over all 162 (dy, dx, flip) cells.
    assert chi2_contingency(torch.stack(list(joint.values())).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_path_is_seeded_and_leaves_the_global_rng_alone(workers):
    split = random_split()
    norm = Normalizer.fit(split.images)
    make = lambda seed: DataLoaderBatches(split, norm, batch_size=32, translate=PAD, flip=True,  # noqa: E731
                                          seed=seed, num_workers=workers)
    a, b, c = make(3), make(3), make(4)
    rng_before = torch.get_rng_state()
    epoch_a = list(a)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(epoch_a, b, strict=True))
    assert not torch.equal(epoch_a[0][0], next(iter(c))[0])
    second = list(a)  # the next epoch: new order, new augmentation
    assert not torch.equal(second[0][1], epoch_a[0][1])


def test_dataloader_path_resumes_from_its_state():
    split = random_split()
    norm = Normalizer.fit(split.images)
    a = DataLoaderBatches(split, norm, batch_size=32, translate=PAD, flip=True, seed=3)
    list(a)
    state = a.state_dict()
    b = DataLoaderBatches(split, norm, batch_size=32, translate=PAD, flip=True, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


def test_make_train_batches_follows_the_config():
    from omegaconf import OmegaConf
    split = random_split()
    cfg = OmegaConf.create({"batch_size": 32, "seed": 1, "max_steps_per_epoch": 2, "num_workers": 0,
                            "dataset": {"translate": 2, "flip": False, "loader": "dataloader"}})
    batches = make_train_batches(cfg, split, Normalizer.fit(split.images), torch.device("cpu"), True)
    assert isinstance(batches, DataLoaderBatches) and len(batches) == 2
    x, _ = next(iter(batches))
    assert x.is_contiguous(memory_format=torch.channels_last)
    cfg.dataset.loader = "device"
    assert isinstance(make_train_batches(cfg, split, Normalizer.fit(split.images), torch.device("cpu"), False),
                      TrainBatches)


def test_training_through_the_dataloader_path(tmp_path):
    # (dataset.loader=disk, an unknown loader, is one of test_bad_input.py's cases)
    results = train_in_process(tmp_path / "run", *TINY, "dataset.loader=dataloader", "num_workers=1")
    assert results["config"]["dataset"]["loader"] == "dataloader" and results["status"] == "finished"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "finished"
