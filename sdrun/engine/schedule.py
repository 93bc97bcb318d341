"""The learning-rate schedule: a step schedule with an optional constant warm-up.

Two readings of a milestone m (optim.epoch_base, see sdrun.config.EpochBase):

- `zero` (the paper's text, "divided by 10 at epochs 250 and 375"): the lr drops after m
  completed epochs, so CIFAR's 500 epochs run 250 / 125 / 125 at 0.1 / 0.01 / 0.001.
- `one` (the reference code, yueatsprograms/Stochastic_Depth main.lua): epochs are numbered
  from 1 and the lr is 0.1 while `epoch < 0.5 * maxEpochs`, 0.01 while `epoch < 0.75 *
  maxEpochs`; so the drop comes one epoch earlier: 249 / 125 / 126 on CIFAR (500 epochs,
  milestones 250 and 375) and 29 / 5 / 16 on SVHN (50 epochs, milestones 30 and 35, its
  0.6 and 0.7 of 50).
"""

from __future__ import annotations

from typing import Any


def lr_at(epoch: int, optim: Any) -> float:
    """The lr of the epoch with 0-based index `epoch` (the loop's counter).

    lr x gamma^(number of milestones reached), where "reached" depends on optim.epoch_base;
    warmup_lr for the first warmup_epochs epochs (ResNet-1202's warm-up).
    """
    if epoch < optim.warmup_epochs:
        return optim.warmup_lr
    # The epoch's number under the chosen convention: `one` compares the 1-based number.
    number = epoch + 1 if str(getattr(optim, "epoch_base", "zero")) == "one" else epoch
    return optim.lr * optim.gamma ** sum(number >= m for m in optim.milestones)


def epochs_per_lr(epochs: int, optim: Any) -> list[tuple[float, int]]:
    """The schedule as consecutive (lr, number of epochs) segments: what the tests pin and the README quotes."""
    segments: list[tuple[float, int]] = []
    for e in range(epochs):
        lr = round(lr_at(e, optim), 12)
        if segments and segments[-1][0] == lr:
            segments[-1] = (lr, segments[-1][1] + 1)
        else:
            segments.append((lr, 1))
    return segments
