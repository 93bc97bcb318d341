"""The stochastic-depth mechanism, independent of any block type.

Three pieces (the paper's section 3):
- `survival_probs`: p_l for l = 1..L (linear decay or uniform).
- `GateSampler`: one Bernoulli draw per block per mini-batch, all blocks at once, from a
  dedicated CPU generator, so drawing never syncs with an accelerator and every process of
  a distributed run draws identical gates from the same seed.
- `StochasticResidual`: wraps any residual branch and shortcut. A closed gate means the
  branch is not called at all: no forward, no backward, no BatchNorm statistics update.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

SURVIVAL_RULES = ("linear", "uniform")
BRANCH_SCALINGS = ("paper", "inverted")


def survival_probs(num_blocks: int, p_last: float, rule: str = "linear") -> list[float]:
    """p_l for blocks l = 1..L (index 0 holds block 1).

    linear:  p_l = 1 - (l / L) * (1 - p_L), so block L gets exactly p_L.
    uniform: p_l = p_L for every block.
    """
    if num_blocks < 1:
        raise ValueError(f"need at least one residual block, got {num_blocks}")
    if not 0.0 <= p_last <= 1.0:
        raise ValueError(f"pL must lie in [0, 1], got {p_last}")
    if rule == "linear":
        return [1.0 - (l / num_blocks) * (1.0 - p_last) for l in range(1, num_blocks + 1)]
    if rule == "uniform":
        return [float(p_last)] * num_blocks
    raise ValueError(f"unknown survival rule {rule!r}; expected one of {SURVIVAL_RULES}")


def expected_active_blocks(probs: Sequence[float]) -> float:
    """E[number of blocks that run in a training step] = sum of p_l ((3L-1)/4 for linear, pL=0.5)."""
    return float(sum(probs))


class GateSampler:
    """Draws the per-step gates for all blocks at once from its own CPU generator.

    The generator is separate from torch's global RNG so that gate draws are reproducible
    whatever else consumes random numbers (data augmentation, dropout, cuDNN), identical on
    every rank of a distributed run, and restorable from a checkpoint (`state_dict`).
    """

    def __init__(self, probs: Sequence[float], seed: int):
        self.probs = torch.tensor(list(probs), dtype=torch.float64)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def draw(self) -> list[bool]:
        # One uniform per block; block l survives when u_l < p_l. p_l = 1 always survives.
        u = torch.rand(len(self.probs), generator=self.generator, dtype=torch.float64)
        return (u < self.probs).tolist()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class StochasticResidual(nn.Module):
    """H_out = act(shortcut(x) + scale * branch(x)), with the branch skipped when its gate is closed.

    `gate` semantics (one value per call):
      True  -> training rule: the branch runs; scale 1 (paper) or 1/p (inverted variant).
      False -> the block is dropped: only act(shortcut(x)); the branch is never called.
      None  -> test rule: the branch runs; scale p (paper) or 1 (inverted variant).
    On the dropped path the paper's H_l = ReLU(id(H_{l-1})) equals id(H_{l-1}): a block's
    input is a ReLU output (stem or previous block), hence non-negative, and average pooling
    and zero padding keep it so. The no-op ReLU is skipped (an in-place one would also
    clobber the previous block's output that autograd still needs). A projection shortcut
    (ImageNet ResNets) can output negatives: act_on_drop=True keeps the ReLU there.
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module, survival_prob: float,
                 scaling: str = "paper", act_on_drop: bool = False):
        super().__init__()
        if scaling not in BRANCH_SCALINGS:
            raise ValueError(f"unknown branch scaling {scaling!r}; expected one of {BRANCH_SCALINGS}")
        self.branch = branch
        self.shortcut = shortcut
        self.survival_prob = float(survival_prob)
        self.scaling = scaling
        self.act = nn.ReLU(inplace=True)  # post-activation: the ReLU follows the addition
        # A shortcut that can output negative values (a 1x1 conv + BN projection) needs the
        # activation on the dropped path too; it writes into the shortcut's fresh output.
        self.act_on_drop = act_on_drop

    def branch_scale(self, gate: bool | None) -> float:
        p = self.survival_prob
        if gate is None:  # test time: expectation over the training-time gate
            return p if self.scaling == "paper" else 1.0
        return 1.0 if self.scaling == "paper" else 1.0 / p

    def forward(self, x: torch.Tensor, gate: bool | None = None) -> torch.Tensor:
        identity = self.shortcut(x)
        if gate is False:
            return self.act(identity) if self.act_on_drop else identity
        out = self.branch(x)
        scale = self.branch_scale(gate)
        if scale != 1.0:
            out = out * scale
        return self.act(out + identity)


def run_blocks(blocks: Sequence[StochasticResidual], x: torch.Tensor,
               gates: Sequence[bool | None] | None) -> torch.Tensor:
    """Apply residual blocks in order; gates[i] is block i's gate (None for the test rule)."""
    if gates is None:
        for block in blocks:
            x = block(x)
        return x
    if len(gates) != len(blocks):
        raise ValueError(f"got {len(gates)} gates for {len(blocks)} residual blocks")
    for block, gate in zip(blocks, gates):
        x = block(x, gate)
    return x
