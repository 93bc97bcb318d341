"""The DataLoader path for the small-image datasets (`dataset.loader=dataloader`).

A `torch.utils.data.DataLoader` over the uint8 split in host memory, each image normalised and
augmented by torchvision's own transforms (`RandomCrop(size, padding=translate, fill=0)` after
normalisation, so the fill is the mean image, then `RandomHorizontalFlip(0.5)`), optionally in
`num_workers` processes. It is the reference the device path (sdrun.data.batches.TrainBatches)
is checked against (tests/test_cifar_loader.py).

Both paths take the epoch order from the same seed stream ("data"), one permutation per
epoch, so for the same seed they yield the same images in the same batches; only the
augmentation draws differ (batched draws on one side, torchvision's per-image draws on
the other), with the same distribution. Without augmentation the batches are identical.
"""


from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from sdrun.data.batches import Normalizer, steps_per_epoch
from sdrun.data.readers import Split
from sdrun.rng import cpu_generator


class EpochOrder(Sampler[int]):
    """One permutation per epoch from `generator`, drawn exactly as TrainBatches draws it.

    (torch's RandomSampler draws a second, empty permutation at the end of each epoch, so
    its order would drift from the device path's after the first epoch.)
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


class AugmentedImages(Dataset):
    """Image i of a uint8 split, normalised, then passed through torchvision transforms."""

    def __init__(self, split: Split, normalizer: Normalizer, transform):
        self.split, self.normalizer, self.transform = split, normalizer, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.normalizer(self.split.images[i])), self.split.labels[i]


def paper_augmentation(image_size: int, translate: int, flip: bool) -> v2.Transform:
    """+-translate px translation (zero fill: the inputs are already normalised) and p=0.5 flips."""
    steps = []
    if translate:
        steps.append(v2.RandomCrop(image_size, padding=translate, fill=0, padding_mode="constant"))
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps) if steps else v2.Identity()


class DataLoaderBatches:
    """One epoch of training batches from a DataLoader; the same interface as TrainBatches.

    Randomness: the order comes from the "data" stream (as on the device path). torchvision's
    transforms draw from torch's global RNG; in worker processes DataLoader seeds that from
    its own generator (here the "augment" stream), and with num_workers=0 each batch is drawn
    under `torch.random.fork_rng` from a private RNG state, so the run's global RNG is never
    touched. Runs are reproducible for a fixed seed and num_workers (0 and >0 draw differently).
    """

    def __init__(self, split: Split, normalizer: Normalizer, batch_size: int, translate: int,
                 flip: bool, seed: int, max_steps: int | None = None, channels_last: bool = False,
                 device: torch.device | str = "cpu", num_workers: int = 0):
        if split.images.device.type != "cpu":
            raise ValueError("the DataLoader path reads the split from host memory")
        self.device = torch.device(device)
        self.batch_size, self.max_steps, self.channels_last = batch_size, max_steps, channels_last
        self.generator = cpu_generator(seed, "data")
        self.augment_generator = cpu_generator(seed, "augment")
        # The private global-RNG state for num_workers=0 (torchvision draws from the global RNG).
        self._augment_rng = torch.Generator().manual_seed(
            int(torch.randint(2**62, (1,), generator=self.augment_generator))).get_state()
        images = AugmentedImages(split, normalizer.to("cpu"),
                                 paper_augmentation(split.images.shape[-1], translate, flip))
        self.loader = DataLoader(images, batch_size=batch_size, sampler=EpochOrder(len(split), self.generator),
                                 num_workers=num_workers, generator=self.augment_generator,
                                 pin_memory=self.device.type == "cuda", drop_last=False)

    def __len__(self) -> int:
        return steps_per_epoch(len(self.loader.sampler), self.batch_size, max_steps=self.max_steps)

    def global_batch_size(self, step: int) -> int:  # one process only: the global batch is the batch
        return min(self.batch_size, len(self.loader.sampler) - (step - 1) * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.loader)
        for _ in range(len(self)):
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self._augment_rng)
                x, y = next(batches)
                self._augment_rng = torch.get_rng_state()
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "augment": self.augment_generator.get_state(),
                "augment_rng": self._augment_rng}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.augment_generator.set_state(state["augment"])
        self._augment_rng = state["augment_rng"]
