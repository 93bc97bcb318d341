"""The optimiser: SGD exactly as the reference code ran it."""

from __future__ import annotations

import torch


def make_optimizer(model: torch.nn.Module, optim) -> torch.optim.SGD:
    """SGD as in the reference code: Nesterov, dampening 0, weight decay on every parameter.

    Every parameter gets a zero gradient tensor up front and gradients are zeroed in place
    (never set to None), so a dropped block still receives weight decay and momentum on
    the steps it is skipped, as the Lua reference's optimizer did.
    """
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, dampening=0.0,
                           weight_decay=optim.weight_decay, nesterov=optim.nesterov)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
