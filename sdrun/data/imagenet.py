"""ImageNet from an ImageFolder tree, decoded per batch by DataLoader workers.

The layout is the one the usual preparation scripts leave: `root/train/<wnid>/*.JPEG` and
`root/val/<wnid>/*.JPEG`. Workers decode and crop JPEGs to uint8 tensors (pinned memory on
CUDA); the batch is normalised on the device, where it is 4x smaller to copy as uint8.

- Training: RandomResizedCrop(image_size) (area 8-100 %, aspect 3/4-4/3) + horizontal flip
  in the workers, then on the device fb.resnet.torch's (the paper's ImageNet code) colour
  jitter (brightness, contrast, saturation, dataset.color_jitter = 0.4, in random order) and
  AlexNet-style PCA lighting noise (dataset.lighting = 0.1), before normalisation.
- Evaluation: resize the short side to resize_size, centre crop image_size (256 / 224).
- Selection: with dataset.val_size = 0 (the default) the `val/` folder is the evaluation set
  and there is no selection (the paper reports validation error at the end of training);
  with val_size = N > 0, N images of train/ drawn with dataset.split_seed (default: the run's
  seed) are held out for best-epoch selection and `val/` is the test set.

Shuffling and the workers' augmentation seeds come from one CPU generator (the "data"
stream), so a run's batches are reproducible for a given num_workers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from sdrun.data.batches import RunData, global_batch_size, steps_per_epoch, to_device
from sdrun.data.readers import DataError, open_rgb, split_seed
from sdrun.ranks import SINGLE, Context, shard
from sdrun.rng import cpu_generator

# The ImageNet channel statistics in 0..255 units (fb.resnet.torch and torchvision use the same).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


# fb.resnet.torch datasets/imagenet.lua: the eigenvalues and eigenvectors (columns) of the
# covariance of ImageNet's RGB pixels in [0, 1] units, published data of that project
# ("computed from random subset of ImageNet training images"), used by its Lighting transform.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # fb.resnet.torch's grayscale(): ITU-R 601 luma of R, G, B
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2


def grey(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    w = torch.tensor(GREY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, order: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """fb.resnet.torch's ColorJitter, batched, with its random draws given.

    x: float (N, 3, H, W) in any units (every step is linear in x); order: (N, 3) long, the
    operations (0 brightness, 1 contrast, 2 saturation) in the order each image gets them
    (its RandomOrder); alphas: (N, 3), the factor 1 + U(-v, v) of each operation. Each one
    blends x with a target: x * a + target * (1 - a), the target being 0 (brightness), the
    mean of the image's grey (contrast) or its grey image (saturation). No clamping, as there.
    """
    for r in range(order.shape[1]):
        op = order[:, r].to(x.device)
        a = alphas.to(x.device, x.dtype).gather(1, op[:, None]).view(-1, 1, 1, 1)
        g = grey(x)
        is_c = (op == CONTRAST).to(x.dtype).view(-1, 1, 1, 1)
        is_s = (op == SATURATION).to(x.dtype).view(-1, 1, 1, 1)
        target = is_c * g.mean((2, 3), keepdim=True) + is_s * g  # brightness: 0
        x = x * a + target * (1 - a)
    return x


def lighting(x: torch.Tensor, alpha: torch.Tensor, unit: float = 255.0) -> torch.Tensor:
    """fb.resnet.torch's Lighting with its draws given: add to channel i of image n
    sum_j eigvec[i][j] * alpha[n][j] * eigval[j] (in [0, 1] units; x is in `unit` units)."""
    vec = torch.tensor(PCA_EIGVEC, dtype=x.dtype, device=x.device)
    val = torch.tensor(PCA_EIGVAL, dtype=x.dtype, device=x.device)
    rgb = (vec[None] * alpha.to(x.device, x.dtype)[:, None, :] * val).sum(-1)  # (N, 3)
    return x + unit * rgb.view(-1, 3, 1, 1)


class ColorAugment:
    """Colour jitter then lighting on a device batch of uint8 crops (fb.resnet.torch's order:
    RandomSizedCrop, ColorJitter, Lighting, ColorNormalize, HorizontalFlip; the flip commutes
    with the colour steps, so doing it in the workers first changes nothing).

    The draws come from one CPU generator (the run's "color" stream) for the whole global
    batch, and each rank keeps its part, so every image gets its own draws whatever the
    number of processes; its state is checkpointed with the data order."""

    def __init__(self, jitter: float, light: float, generator: torch.Generator):
        self.jitter, self.light, self.generator = float(jitter), float(light), generator

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.generator
        order = torch.rand(n, 3, generator=g).argsort(1)  # a uniformly random permutation per image
        alphas = 1.0 + (torch.rand(n, 3, generator=g) * 2 - 1) * self.jitter
        alpha = torch.randn(n, 3, generator=g) * self.light
        return order, alphas, alpha

    def __call__(self, x_u8: torch.Tensor, draws: tuple) -> torch.Tensor:
        order, alphas, alpha = draws
        x = x_u8.float()
        if self.jitter:
            x = color_jitter(x, order, alphas)
        if self.light:
            x = lighting(x, alpha)
        return x


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
    return T.Compose([T.RandomResizedCrop(size), *([T.RandomHorizontalFlip()] if flip else []), T.PILToTensor()])


def eval_transform(size: int, resize: int):
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.PILToTensor()])


class GlobalBatchSampler(Sampler[list[int]]):
    """Shuffled global batches of `batch_size`; yields this rank's contiguous part of each.

    Every rank shuffles with an identical generator (same seed, same state), so the global
    batches agree across ranks and `batch_size` means the global batch, as on the device
    path (sdrun.data.batches.TrainBatches). In one process it is plain shuffled batching.
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
                 max_steps: int | None = None, channels_last: bool = False,
                 augment: ColorAugment | None = None):
        self.loader, self.normalizer, self.device = loader, normalizer, device
        self.max_steps, self.channels_last, self.augment = max_steps, channels_last, augment

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
                x = x.to(self.device, non_blocking=True)
                if self.augment is not None:  # draws for the whole global batch; this rank keeps its part
                    sampler = self.loader.batch_sampler
                    draws = self.augment.draw(sampler.global_batch_size(step + 1))
                    part = shard(len(draws[0]), sampler.ctx)
                    # One non-blocking copy from pinned memory per draw (a pageable copy would
                    # wait for the GPU's queue every step).
                    x = self.augment(x, tuple(to_device(d[part], self.device) for d in draws))
                x = self.normalizer(x)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(self.device, non_blocking=True)
        except OSError as e:  # an unreadable image; a worker's error carries its traceback, keep the last line
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise DataError(f"imagenet: {lines[-1].removeprefix('OSError: ') if lines else type(e).__name__}") from None

    # The shuffle order and the workers' seeds of an epoch are drawn from this generator when
    # the epoch's iterator starts, so its state at an epoch boundary restores the epoch.
    def state_dict(self) -> dict:
        state = {"generator": self.loader.generator.get_state()} if self.loader.generator is not None else {}
        if self.augment is not None:
            state["color"] = self.augment.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.loader.generator.set_state(state["generator"])
        if "color" in state and self.augment is not None:
            self.augment.generator.set_state(state["color"])


def load_imagenet(cfg, device: torch.device, channels_last: bool = False, ctx: Context = SINGLE) -> RunData:
    """The ImageNet datasets, loaders and normaliser of a run (cfg: the whole train config).

    Distributed (ctx): each rank loads its part of every global training batch and its
    contiguous part of the evaluation sets (the error counts are summed over ranks)."""
    ds_cfg = cfg.dataset
    root = Path(ds_cfg.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"imagenet: expected the folder {root / split}/<wnid>/*.JPEG (the usual "
                            f"ImageFolder layout); set dataset.root")
    try:
        # open_rgb: an undecodable file's error names it (LoaderBatches makes it a DataError)
        train = ImageFolder(str(root / "train"), transform=train_transform(ds_cfg.image_size, ds_cfg.flip),
                            loader=open_rgb)
        test = ImageFolder(str(root / "val"), transform=eval_transform(ds_cfg.image_size, ds_cfg.resize_size),
                           loader=open_rgb)
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
        perm = torch.randperm(len(train), generator=cpu_generator(split_seed(ds_cfg, cfg.seed), "split"))
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
    augment = (ColorAugment(ds_cfg.color_jitter, ds_cfg.lighting, cpu_generator(cfg.seed, "color"))
               if ds_cfg.color_jitter or ds_cfg.lighting else None)
    train_batches = LoaderBatches(loader, normalizer, device, cfg.max_steps_per_epoch, channels_last, augment)

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
