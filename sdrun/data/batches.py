"""Batches made on the device: the paper's normalisation, augmentation and epoch order.

A small-image split (sdrun.data.readers) is kept as uint8 on the training device, and every
training batch is gathered, normalised, translated and flipped there with batched tensor ops
(as airbench does): no per-image Python and no DataLoader workers in the training loop.

Order and augmentation come from two dedicated CPU generators, so the batches of a run
are the same on the CPU and on a GPU, and restorable from a checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F

from sdrun.data.readers import Split
from sdrun.ranks import Context, shard
from sdrun.rng import cpu_generator


# ---------------------------------------------------------------- what the trainer consumes

class TrainBatchSource(Protocol):
    """One epoch of training batches per iteration, restorable at epoch boundaries.

    Three implementations: `TrainBatches` (uint8 split on the device, batched augmentation),
    `sdrun.data.loader.DataLoaderBatches` (torchvision transforms per image) and
    `sdrun.data.imagenet.LoaderBatches` (JPEGs decoded by DataLoader workers).
    """

    def __len__(self) -> int: ...          # steps in one epoch (after max_steps_per_epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...  # (images, labels) on the device

    def global_batch_size(self, step: int) -> int: ...  # images in the global batch of 1-based `step`

    def state_dict(self) -> dict: ...      # the generators that draw the next epoch

    def load_state_dict(self, state: dict) -> None: ...


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1, max_steps: int | None = None) -> int:
    """Steps in an epoch of n images: the last, smaller batch is kept, unless some rank's slice
    of it would be empty (distributed); capped at max_steps."""
    steps = -(-n // batch_size)
    if world_size > 1 and global_batch_size(n, batch_size, steps) < world_size:
        steps -= 1
    return steps if max_steps is None else min(steps, max_steps)


def global_batch_size(n: int, batch_size: int, step: int) -> int:
    """Images in the global batch of 1-based `step` of an epoch of n images; only the last can be smaller."""
    return min(batch_size, n - (step - 1) * batch_size)


@dataclass
class RunData:
    """The data of one run, as the trainer uses it (built by sdrun.data.build.build_run_data)."""
    train: Split | object   # a Split, or a torch Dataset (ImageNet); only len() is used by the trainer
    val: Split | object | None
    test: Split | object
    classes: list[str]
    normalizer: object     # state_dict() is saved in checkpoints for sdrun analyze
    train_batches: TrainBatchSource
    # "val" | "test" -> a fresh iterable of (images, labels) device batches; None without the split
    eval_sets: dict[str, Callable[[], Iterable] | None]


# ---------------------------------------------------------------- normalisation and batches

class Normalizer:
    """(image - mean) / std, with mean and std fitted on the training split (sdrun.config).

    normalization="pixel": the per-pixel mean image (C, H, W) and one global std (the paper;
    the reference code). normalization="channel": a mean and a std per colour channel
    (fb.resnet.torch's CIFAR code). Zero after normalisation is the mean, so zero-filled
    translation fills with the mean, as in the paper and the reference.
    """

    def __init__(self, mean: torch.Tensor, std: float | torch.Tensor):
        self.mean = mean.float()  # (C, H, W), or (C, 1, 1) per channel
        # one float, or a (C, 1, 1) tensor per channel
        self.std = std.float() if isinstance(std, torch.Tensor) else float(std)

    @classmethod
    def fit(cls, images: torch.Tensor, std_rule: str = "centred", normalization: str = "pixel",
            chunk: int = 4096) -> "Normalizer":
        """Fit on uint8 (N, C, H, W) images in one pass, without a float64 copy of the set.

        std_rule="centred": the population std of the pixels after the mean is subtracted.
        std_rule="raw": the unbiased (n - 1) std of the raw pixels around their global mean,
        as the reference's `data:std()` on the not yet centred training tensor (Torch7's
        std() divides by n - 1); with normalization="channel", around each channel's mean.

        Per-pixel sums of x and x^2 are exact: each block of 256 images is summed in float32
        (every partial sum is an integer below 256 * 255^2 < 2^24, so float32 holds it
        exactly, in any summation order), blocks are added in float64. About 4x faster than
        the former float64 two-pass fit (100k random 32x32x3 images: 26.8 s -> 6.1 s on the
        busy 2-core dev machine, same std to the last bit). The results equal a float64 computation
        to float64 rounding (relative 1e-12 or better; tests/test_fidelity.py checks 1e-9).
        """
        std_rule, normalization = str(std_rule), str(normalization)
        if std_rule not in ("raw", "centred") or normalization not in ("pixel", "channel"):
            raise ValueError(f"unknown std_rule {std_rule!r} or normalization {normalization!r}")
        n, shape = len(images), images.shape[1:]
        flat = images.reshape(n, -1)
        s1 = torch.zeros(flat.shape[1], dtype=torch.float64)
        s2 = torch.zeros(flat.shape[1], dtype=torch.float64)
        block = 256
        for i in range(0, n, chunk):
            x = flat[i:i + chunk].cpu().float()
            if len(x) % block:  # zero rows add nothing to either sum
                x = torch.cat([x, x.new_zeros(block - len(x) % block, x.shape[1])])
            x = x.view(-1, block, x.shape[1])
            ones = x.new_ones(len(x), 1, block)  # block sums as one batched GEMM (faster than sum(1))
            s1 += torch.bmm(ones, x).sum((0, 1), dtype=torch.float64)
            s2 += torch.bmm(ones, x.mul_(x)).sum((0, 1), dtype=torch.float64)
        s1, s2 = s1.view(shape), s2.view(shape)
        c = shape[0]
        if normalization == "channel":
            count = n * s1[0].numel()  # values per channel
            mean = (s1.view(c, -1).sum(1) / count).view(c, 1, 1)
            sq = s2.view(c, -1).sum(1) - count * mean.flatten() ** 2  # sum of squares around the channel mean
            denom = count - 1 if std_rule == "raw" else count
            return cls(mean, (sq / denom).clamp_min(0).sqrt().view(c, 1, 1))
        mean = s1 / n  # the per-pixel mean image
        total = n * s1.numel()
        if std_rule == "raw":
            sq = s2.sum() - s1.sum() ** 2 / total  # around the global scalar mean
            std = (sq / (total - 1)).clamp_min(0).sqrt()
        else:
            sq = (s2 - s1 * s1 / n).sum()  # around the per-pixel mean
            std = (sq / total).clamp_min(0).sqrt()
        return cls(mean, float(std))

    def describe(self) -> str:
        """One line for the log: what was fitted."""
        if isinstance(self.std, torch.Tensor):
            return (f"per-channel mean {[round(v, 2) for v in self.mean.flatten().tolist()]} "
                    f"and std {[round(v, 2) for v in self.std.flatten().tolist()]}")
        return f"per-pixel mean image (overall {self.mean.mean().item():.2f}) and one std {self.std:.4f}"

    def to(self, device) -> "Normalizer":
        std = self.std.to(device) if isinstance(self.std, torch.Tensor) else self.std
        return Normalizer(self.mean.to(device), std)

    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        return (images_u8.float() - self.mean) / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "std": self.std.cpu() if isinstance(self.std, torch.Tensor) else self.std}


def fit_normalizer(images: torch.Tensor, dataset_cfg) -> Normalizer:
    """Normalizer.fit with the run's dataset.std_rule / dataset.normalization, logged with its time
    (SVHN's 598k training images take seconds, not the minute the float64 version did)."""
    log = logging.getLogger("sdrun")
    std_rule, normalization = str(dataset_cfg.std_rule), str(dataset_cfg.normalization)
    log.info("normalisation: fitting the %s mean and the %s std on %d training images...",
             normalization, std_rule, len(images))
    t0 = time.perf_counter()
    normalizer = Normalizer.fit(images, std_rule, normalization)
    log.info("normalisation: %s (%.1fs)", normalizer.describe(), time.perf_counter() - t0)
    return normalizer


def translate_and_flip(x: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor,
                       flip: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Batched: out[n] = flip_n(crop of zero-padded x[n] at offset (pad+shift_y, pad+shift_x)).

    Equivalent to torchvision's RandomCrop(size, padding=pad) followed by
    RandomHorizontalFlip, with the per-image parameters given instead of drawn (flip=None:
    no flipping). The parameters must be on x's device: nothing here reads a value back to
    the host or makes a shape depend on the data, so on CUDA the step never waits for the GPU
    (tests/test_no_sync.py).
    """
    n, c, h, w = x.shape
    if pad:
        # Every (2pad+1)^2 crop of the zero-padded batch as one strided view; a single gather
        # then copies each image's crop (2.5x faster on the CPU than indexing every pixel).
        windows = F.pad(x, (pad, pad, pad, pad)).unfold(2, h, 1).unfold(3, w, 1)  # (n, c, 2p+1, 2p+1, h, w)
        x = windows[torch.arange(n, device=x.device), :, shift_y + pad, shift_x + pad]
    if flip is not None:
        # A select over the whole batch instead of gathering the flipped images: their indices
        # (nonzero) would have a data-dependent length, read back from the GPU every step.
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting: on CUDA, copied from pinned memory with
    non_blocking=True (a copy from pageable memory blocks the host until the GPU's queue has
    drained, so the CPU could not run ahead of the GPU)."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class TrainBatches:
    """One epoch of shuffled, normalised, augmented batches from a device-resident split.

    In a distributed run (world_size > 1) `batch_size` is the global batch: every rank
    draws the same order and augmentation for the whole global batch (same generator,
    same seed) and yields only its contiguous slice (sdrun.ranks.shard).
    """

    def __init__(self, split: Split, normalizer: Normalizer, batch_size: int, translate: int,
                 flip: bool, seed: int, max_steps: int | None = None, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        self.split, self.normalizer = split, normalizer
        self.batch_size, self.translate, self.flip = batch_size, translate, flip
        self.max_steps, self.channels_last = max_steps, channels_last
        self.rank, self.world_size = rank, world_size
        # Order and augmentation draw from separate streams, so the order of a seed does not
        # depend on the augmentation settings and equals the DataLoader path's (sdrun.data.build).
        self.generator = cpu_generator(seed, "data")
        self.augment_generator = cpu_generator(seed, "augment")

    def __len__(self) -> int:
        return steps_per_epoch(len(self.split), self.batch_size, self.world_size, self.max_steps)

    def global_batch_size(self, step: int) -> int:
        return global_batch_size(len(self.split), self.batch_size, step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        steps = self.draw_epoch()
        if not steps:
            return
        device = self.split.images.device
        # The whole epoch's indices and parameters reach the device in one copy each; a step
        # only slices them, so no step copies from the host (or waits for the GPU).
        idx, shift_y, shift_x = (to_device(torch.cat(column), device) for column in list(zip(*steps))[:3])
        flip = None if not self.flip else to_device(torch.cat([s[3] for s in steps]), device)
        start = 0
        for step in steps:
            part = slice(start, start + len(step[0]))
            start = part.stop
            x = self.normalizer(self.split.images[idx[part]])
            x = translate_and_flip(x, shift_y[part], shift_x[part], None if flip is None else flip[part],
                                   self.translate)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.split.labels[idx[part]]

    def draw_epoch(self) -> list[tuple[torch.Tensor, ...]]:
        """This rank's (indices, shift_y, shift_x, flip or None) of every step of the next epoch,
        on the host, drawn in the order one step at a time would draw them (so a seed gives the
        same batches as it always did, and the generators' state after the epoch is the same)."""
        g, t = self.augment_generator, self.translate
        order = torch.randperm(len(self.split), generator=self.generator)
        steps = []
        for step in range(len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            n = len(idx)
            shift_y = torch.randint(-t, t + 1, (n,), generator=g)
            shift_x = torch.randint(-t, t + 1, (n,), generator=g)
            flip = torch.rand(n, generator=g) < 0.5 if self.flip else None
            if self.world_size > 1:  # every rank drew the global batch above; keep this rank's part
                part = shard(n, Context(self.rank, self.world_size))
                idx, shift_y, shift_x = idx[part], shift_y[part], shift_x[part]
                flip = None if flip is None else flip[part]
            steps.append((idx, shift_y, shift_x, flip))
        return steps

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "augment": self.augment_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.augment_generator.set_state(state["augment"])


def eval_batches(split: Split, normalizer: Normalizer, batch_size: int,
                 channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(split), batch_size):
        x = normalizer(split.images[i:i + batch_size])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, split.labels[i:i + batch_size]
