"""A run's data as the trainer uses it: `build_run_data` reads the dataset, fits the normaliser,
and makes the training batch source and the evaluation passes, for every dataset.

For the small-image datasets (CIFAR, SVHN, digits) there are two training paths:
`dataset.loader=device` (default): sdrun.data.batches.TrainBatches, the whole uint8 split on the
training device, batches normalised, translated and flipped there with batched tensor ops;
`dataset.loader=dataloader`: sdrun.data.loader.DataLoaderBatches, torchvision transforms per
image. ImageNet is decoded from JPEGs by DataLoader workers (sdrun.data.imagenet).
"""

from __future__ import annotations

import torch

from sdrun.data.batches import Normalizer, RunData, TrainBatches, eval_batches, fit_normalizer
from sdrun.data.imagenet import load_imagenet
from sdrun.data.loader import DataLoaderBatches
from sdrun.data.readers import Split, load_image_data
from sdrun.ranks import SINGLE, Context, shard


def make_train_batches(cfg, split: Split, normalizer: Normalizer, device: torch.device,
                       channels_last: bool, rank: int = 0, world_size: int = 1) -> TrainBatches | DataLoaderBatches:
    """The training batches of `cfg.dataset.loader`: the split and normalizer come in on the CPU.

    Distributed runs (world_size > 1) use the device path, which shards each global batch."""
    ds = cfg.dataset
    common = dict(batch_size=cfg.batch_size, translate=ds.translate, flip=ds.flip, seed=cfg.seed,
                  max_steps=cfg.max_steps_per_epoch, channels_last=channels_last)
    if str(ds.loader) == "dataloader":
        return DataLoaderBatches(split, normalizer, device=device, num_workers=cfg.num_workers, **common)
    return TrainBatches(split.to(device), normalizer.to(device), **common, rank=rank, world_size=world_size)


def build_run_data(cfg, device: torch.device, channels_last: bool,
                   ctx: Context = SINGLE) -> RunData:
    """The data of a run: uint8 on the device, normalised and augmented per batch there (or,
    with dataset.loader=dataloader, a DataLoader with torchvision transforms); ImageNet is
    decoded from JPEGs per batch by DataLoader workers instead (sdrun.data.imagenet).

    Distributed (ctx): every rank makes the same global batches and keeps its slice; the
    evaluation splits are sharded (each rank counts its part; the counts are summed)."""
    if cfg.dataset.name == "imagenet":
        return load_imagenet(cfg, device, channels_last, ctx)
    data = load_image_data(cfg.dataset, cfg.seed)
    normalizer = fit_normalizer(data.train.images, cfg.dataset)  # std_rule, normalization; logged
    train_batches = make_train_batches(cfg, data.train, normalizer, device, channels_last, ctx.rank, ctx.world_size)
    normalizer = normalizer.to(device)

    def passes(split: Split | None):  # a fresh pass over an evaluation split on each call
        if split is None:
            return None
        part = split.part(shard(len(split), ctx)).to(device)
        return lambda: eval_batches(part, normalizer, cfg.eval_batch_size, channels_last)

    return RunData(data.train, data.val, data.test, data.classes, normalizer, train_batches,
                   {"val": passes(data.val), "test": passes(data.test)})
