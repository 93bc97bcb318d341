"""Per-epoch gradient statistics of a stochastic-depth ResNet, gathered on the device.

The paper's Fig. 7 plots, per epoch, the mean absolute gradient of the first convolution
of the first residual block: stochastic depth keeps it larger, most visibly after each
learning-rate drop. `GradStats` records that quantity for every block l = 1..L, plus the
whole model's gradient norm and how many blocks ran per step.

How it is counted. A dropped block's branch never runs, so it has no gradient from the
loss that step (its .grad is the zero tensor that make_optimizer keeps in place, never
None). A block's figure is therefore averaged over the steps of the epoch in which it
ran, and the number of those steps is kept beside it: for block l,

    grad_mean_abs[l] = (1 / steps_run[l]) * sum over steps where l ran of mean(|dLoss/dW_l|)

with W_l its first conv's weight and the gradient that of the loss alone (before weight
decay and momentum, which the optimiser adds inside step()). It is None when the block
never ran in the epoch.

Cost. The gates are a CPU list of bools, so the blocks that ran are selected on the host
and no mask is sent to the device. Each step adds one foreach L1-norm over the ran
blocks' first-conv gradients into per-block device accumulators (one fused op on CUDA)
and one foreach L2-norm over all gradients for the model norm; nothing is read back
until `end_epoch`, which makes the epoch's one host transfer. scripts/bench_gradstats.py
measures the overhead.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sdrun.model.resnet import first_conv


class GradStats:
    """Accumulates one epoch of per-block gradient statistics; `end_epoch` reads and resets."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.enabled = enabled
        self.conv_weights = [first_conv(block).weight for block in model.blocks]
        self.conv_numel = [w.numel() for w in self.conv_weights]
        self.params = list(model.parameters())
        self.num_blocks = len(self.conv_weights)
        self.last_gates: list[bool] = []
        self._reset()

    def _reset(self) -> None:
        device = self.conv_weights[0].device
        # One 0-d accumulator per block (not one vector) so a step can add into exactly the
        # blocks that ran with a single foreach op, without building an index on the device.
        self.l1_sums = [torch.zeros((), device=device) for _ in range(self.num_blocks)]
        self.norm_sum = torch.zeros((), device=device)
        self.steps_run = [0] * self.num_blocks
        self.active_hist = [0] * (self.num_blocks + 1)
        self.steps = 0

    @torch.no_grad()
    def record(self, gates: Sequence[bool]) -> None:
        """Call after loss.backward() and before optimizer.step(), with the step's gates."""
        ran = [i for i, gate in enumerate(gates) if gate]
        self.last_gates = list(gates)
        self.steps += 1
        self.active_hist[len(ran)] += 1
        for i in ran:
            self.steps_run[i] += 1
        if not self.enabled:
            return
        if ran:
            l1 = torch._foreach_norm([self.conv_weights[i].grad for i in ran], 1)
            torch._foreach_add_([self.l1_sums[i] for i in ran], l1)
        grads = [p.grad for p in self.params if p.grad is not None]
        self.norm_sum += torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)))

    def end_epoch(self) -> dict:
        """The epoch's statistics as metrics.jsonl keys (one host transfer), then reset.

        grad_mean_abs: per block, mean |grad| of its first conv over the steps it ran (None
                       where it never ran); grad_steps: those step counts; grad_norm: mean
                       over steps of the whole model's gradient L2 norm; active_blocks_hist:
                       number of steps in which k = 0..L blocks ran.
        The gradient keys are left out when gradient statistics are disabled.
        """
        out = {"active_blocks_hist": self.active_hist}
        if self.enabled and self.steps:
            l1_sums = torch.stack(self.l1_sums).tolist()
            out["grad_mean_abs"] = [s / (n * numel) if n else None
                                    for s, n, numel in zip(l1_sums, self.steps_run, self.conv_numel)]
            out["grad_steps"] = self.steps_run
            out["grad_norm"] = self.norm_sum.item() / self.steps
        self._reset()
        return out
