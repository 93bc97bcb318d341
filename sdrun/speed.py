"""Per-branch torch.compile: compiled kernels without losing the skip savings.

Compiling the whole model would trace one Python loop over the blocks with the gates as
constants, so every new gate pattern (2^L of them) would be a new graph. Compiling each
residual branch on its own keeps the gate decision in eager Python: a dropped branch is
simply not called, and the compiled branches only ever see a handful of shapes (one per
stage, one per transition block, train and eval mode).
"""

from __future__ import annotations

import torch
from torch import nn

from sdrun.stochastic import StochasticResidual

# All branches share nn.Module's call code, so dynamo counts their graphs against one
# recompile limit (8 by default). A CIFAR ResNet needs about 14: 5 branch shapes (3 stages,
# 2 transitions) x train/eval, plus one dynamic-batch recompile for the smaller last batch.
RECOMPILE_LIMIT = 64


def compile_branches(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile, in place, the residual branch of every StochasticResidual of `model`.

    `nn.Module.compile` leaves the parameter names unchanged, so state dicts and
    checkpoints are the same with and without compilation. Returns the number of branches.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = [m for m in model.modules() if isinstance(m, StochasticResidual)]
    for block in blocks:
        block.branch.compile(backend=backend, mode=mode)
    return len(blocks)
