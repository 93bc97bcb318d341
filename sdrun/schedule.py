"""The learning-rate schedule: a step schedule with an optional constant warm-up."""

from __future__ import annotations


def lr_at(epoch: int, optim) -> float:
    """Step schedule: lr x gamma^(number of milestones <= epoch); warm-up lr before warmup_epochs.

    `epoch` counts from 0, so milestones [250, 375] give lr 0.1 for epochs 0..249 (the
    paper's first 250 epochs), 0.01 for 250..374, 0.001 after.
    """
    if epoch < optim.warmup_epochs:
        return optim.warmup_lr
    return optim.lr * optim.gamma ** sum(epoch >= m for m in optim.milestones)
