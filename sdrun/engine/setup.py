"""One run's pieces, built from its config: what `sdrun train`, `check=true` and `sdrun bench`
all train with, so the three can never drift apart (tests/test_bench.py holds them together).

`build_run(cfg, ctx, saved)` resolves the device and precision, seeds, reads the data, builds
the network the config describes (model_for: the reference's or the paper's choices), applies
the speed mode, makes the optimiser and the gate sampler, restores a checkpoint when there is
one, and wraps the model in DDP when the run spans several processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from sdrun.data import RunData, build_run_data
from sdrun.engine import distributed
from sdrun.engine.gradstats import GradStats
from sdrun.engine.optim import make_optimizer
from sdrun.engine.runtime import Runtime, resolve_runtime
from sdrun.engine.speed import apply_speed
from sdrun.engine.state import SavedRun, TrainState
from sdrun.model import GateSampler, expected_active_blocks, model_for
from sdrun.ranks import SINGLE, Context
from sdrun.rng import derive_seed, seed_global


@dataclass
class Run:
    """Everything one run trains with."""
    cfg: DictConfig
    ctx: Context            # this process's rank and the run's world size
    rt: Runtime             # device, precision, memory layout
    data: RunData
    model: nn.Module        # the network itself: checkpoints, evaluation, gradient statistics
    net: nn.Module          # what a training step calls: the model, or DDP around it
    state: TrainState       # everything the next step depends on (the checkpoint)
    grad_stats: GradStats
    speed: str              # the speed mode in force (sdrun.engine.speed)

    @property
    def expected_depth(self) -> float:
        """Expected blocks run per step: sum of the survival probabilities."""
        return expected_active_blocks(self.model.survival_probs)


def build_run(cfg: DictConfig, ctx: Context = SINGLE, saved: SavedRun | None = None) -> Run:
    """The run `cfg` describes, on this process's device; `saved`: a checkpoint to continue from."""
    rt = resolve_runtime(cfg)
    rt.device = distributed.place(rt.device, ctx)
    seed_global(cfg.seed)  # before the data's split and the model's init, which draw from it
    data = build_run_data(cfg, rt.device, rt.channels_last, ctx)
    model = model_for(cfg).to(rt.device, memory_format=torch.channels_last if rt.channels_last
                              else torch.preserve_format)
    speed = apply_speed(model, cfg.speed, rt.device, ctx.world_size)  # eager | compile | graphs
    state = TrainState(model, make_optimizer(model, cfg.optim),
                       GateSampler(model.survival_probs, derive_seed(cfg.seed, "gates")),
                       data.train_batches, data.normalizer)
    if saved is not None:  # every piece of state the next step depends on comes back
        state.restore(saved)
    net = distributed.wrap(model, rt.device, ctx, cfg.sync_bn)  # after the restore: DDP starts from it
    return Run(cfg, ctx, rt, data, model, net, state, GradStats(model, enabled=cfg.log.grad_stats), speed)
