"""ImageNet from an ImageFolder tree, decoded per batch by DataLoader workers.

The layout is the one the usual preparation scripts leave: `root/train/<wnid>/*.JPEG` and
`root/val/<wnid>/*.JPEG`. Workers decode and crop JPEGs to uint8 tensors (pinned memory on
CUDA); the batch is normalised on the device, where it is 4x smaller to copy as uint8.

- Training: RandomResizedCrop(image_size) (area 8-100 %, aspect 3/4-4/3) + horizontal flip,
  as fb.resnet.torch (the paper's ImageNet code) minus its colour jitter and PCA lighting.
- Evaluation: resize the short side to resize_size, centre crop image_size (256 / 224).
- Selection: with dataset.val_size = 0 (the default) the `val/` folder is the evaluation set
  and there is no selection (the paper reports validation error at the end of training);
  with val_size = N > 0, N images of train/ drawn with the run's seed are held out for
  best-epoch selection and `val/` is the test set.

Shuffling and the workers' augmentation seeds come from one CPU generator (the "data"
stream), so a run's batches are reproducible for a given num_workers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from sdrun.data import DataError, RunData, global_batch_size, steps_per_epoch
from sdrun.distributed import SINGLE, Context, shard
from sdrun.rng import cpu_generator

# The ImageNet channel statistics in 0..255 units (fb.resnet.torch and torchvision use the same).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class ChannelNormalizer:
    """(uint8 image - per-channel mean) / per-channel std, run on the device."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu"):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)

    def to(self, device) -> "ChannelNormalizer":
        return ChannelNormalizer(self.mean.flatten().tolist(), self.std.flatten().tolist(), device)

    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        return (images_u8.float() - self.mean) / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "std": self.std.cpu()}


def train_transform(size: int, flip: bool = True):
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(size), *([T.RandomHorizontalFlip()] if flip else []), T.PILToTensor()])


def eval_transform(size: int, resize: int):
    from torchvision import transforms as T
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.PILToTensor()])


class GlobalBatchSampler(Sampler[list[int]]):
    """Shuffled global batches of `batch_size`; yields this rank's contiguous part of each.

    Every rank shuffles with an identical generator (same seed, same state), so the global
    batches agree across ranks and `batch_size` means the global batch, as on the device
    path (sdrun.data.TrainBatches). In one process it is plain shuffled batching.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, ctx: Context = SINGLE):
        self.n, self.batch_size, self.generator, self.ctx = n, batch_size, generator, ctx

    def __len__(self) -> int:
        return steps_per_epoch(self.n, self.batch_size, self.ctx.world_size)

    def global_batch_size(self, step: int) -> int:
        return global_batch_size(self.n, self.batch_size, step)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        for step in range(len(self)):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield batch[shard(len(batch), self.ctx)]


class LoaderBatches:
    """Batches of a DataLoader moved to the device and normalised there; the TrainBatches interface."""

    def __init__(self, loader: DataLoader, normalizer: ChannelNormalizer, device: torch.device,
                 max_steps: int | None = None, channels_last: bool = False):
        self.loader, self.normalizer, self.device = loader, normalizer, device
        self.max_steps, self.channels_last = max_steps, channels_last

    def __len__(self) -> int:
        return len(self.loader) if self.max_steps is None else min(len(self.loader), self.max_steps)

    @property
    def generator(self) -> torch.Generator | None:
        """Draws the epoch's order and the workers' seeds (identical on every rank)."""
        return self.loader.generator

    def global_batch_size(self, step: int) -> int:
        return self.loader.batch_sampler.global_batch_size(step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for step, (x, y) in enumerate(self.loader):
                if step == len(self):
                    break
                x = self.normalizer(x.to(self.device, non_blocking=True))
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(self.device, non_blocking=True)
        except OSError as e:  # an unreadable image; a worker's error carries its traceback, keep the last line
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise DataError(f"imagenet: {lines[-1] if lines else type(e).__name__}") from None

    # The shuffle order and the workers' seeds of an epoch are drawn from this generator when
    # the epoch's iterator starts, so its state at an epoch boundary restores the epoch.
    def state_dict(self) -> dict:
        return {"generator": self.loader.generator.get_state()} if self.loader.generator is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.loader.generator.set_state(state["generator"])


def load_imagenet(cfg, device: torch.device, channels_last: bool = False, ctx: Context = SINGLE) -> RunData:
    """The ImageNet datasets, loaders and normaliser of a run (cfg: the whole train config).

    Distributed (ctx): each rank loads its part of every global training batch and its
    contiguous part of the evaluation sets (the error counts are summed over ranks)."""
    from torchvision.datasets import ImageFolder

    ds_cfg = cfg.dataset
    root = Path(ds_cfg.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"imagenet: expected the folder {root / split}/<wnid>/*.JPEG (the usual "
                            f"ImageFolder layout); set dataset.root")
    try:
        train = ImageFolder(str(root / "train"), transform=train_transform(ds_cfg.image_size, ds_cfg.flip))
        test = ImageFolder(str(root / "val"), transform=eval_transform(ds_cfg.image_size, ds_cfg.resize_size))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images in them
        raise DataError(f"imagenet under {root}: {e}") from None
    if test.classes != train.classes:
        raise DataError(f"{root}/train and {root}/val have different class folders "
                        f"({len(train.classes)} vs {len(test.classes)})")
    if len(train.classes) != ds_cfg.num_classes:
        raise DataError(f"imagenet has {len(train.classes)} classes under {root}/train "
                        f"but dataset.num_classes={ds_cfg.num_classes}")

    classes, val = list(train.classes), None
    if ds_cfg.val_size > 0:
        if ds_cfg.val_size >= len(train):
            raise DataError(f"dataset.val_size={ds_cfg.val_size} leaves no training images "
                            f"({len(train)} under {root}/train)")
        perm = torch.randperm(len(train), generator=cpu_generator(cfg.seed, "split"))
        held_out = copy.copy(train)  # same file list, evaluation transform
        held_out.transform = eval_transform(ds_cfg.image_size, ds_cfg.resize_size)
        val = Subset(held_out, perm[:ds_cfg.val_size].sort().values.tolist())
        train = Subset(train, perm[ds_cfg.val_size:].sort().values.tolist())

    pin = device.type == "cuda"
    # Workers are started per epoch (not persistent): their augmentation seeds then come from
    # the loader's generator at each epoch start, so a checkpointed generator state replays
    # the epoch exactly. Start-up costs seconds against an epoch of thousands of steps.
    workers = dict(num_workers=cfg.num_workers, pin_memory=pin)
    generator = cpu_generator(cfg.seed, "data")
    loader = DataLoader(train, batch_sampler=GlobalBatchSampler(len(train), cfg.batch_size, generator, ctx),
                        generator=generator, **workers)
    normalizer = ChannelNormalizer(device=device)
    train_batches = LoaderBatches(loader, normalizer, device, cfg.max_steps_per_epoch, channels_last)

    def eval_set(ds: Dataset | None):
        if ds is None:
            return None
        part = shard(len(ds), ctx)
        ds = Subset(ds, list(range(len(ds)))[part]) if ctx.world_size > 1 else ds
        batches = LoaderBatches(DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False, **workers),
                                normalizer, device, channels_last=channels_last)
        return lambda: batches

    # val is held out from train/ when dataset.val_size > 0; the test set is ImageNet's val/ folder
    return RunData(train, val, test, classes, normalizer, train_batches,
                   {"val": eval_set(val), "test": eval_set(test)})
