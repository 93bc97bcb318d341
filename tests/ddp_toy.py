"""Under torchrun: DDP with dropped blocks gives the single-process update, on every rank.

A tiny stochastic-depth MLP (no BatchNorm, so one process over the global batch is the
exact reference) trains a few steps with gates that drop blocks, once through
sdrun.engine.distributed (DDP, each rank its shard of an unevenly split global batch) and once
in plain single-process PyTorch. Each rank writes OUT_DIR/rank<RANK>.json with the largest
difference to the reference and a fingerprint of its parameters.

`check(OUT_DIR)` joins the process group and leaves it up: tests/ddp_probe.py calls it
before its training run in the same torchrun launch (a launch costs seconds of start-up).
"""

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from sdrun.engine import distributed
from sdrun.model.stochastic import StochasticResidual, run_blocks
from sdrun.engine.optim import make_optimizer
from sdrun.ranks import SINGLE, shard

GATES = [[True, True, True], [True, False, True], [False, False, True], [True, False, False]]
# A large weight decay makes its effect on the dropped blocks' parameters visible.
OPTIM = OmegaConf.create({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05, "nesterov": True})


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            StochasticResidual(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), nn.Identity(), 0.5)
            for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, x, gates=None):
        return self.head(run_blocks(self.blocks, x, gates))


def train(model, module, ctx, x, y):
    optimizer = make_optimizer(model, OPTIM)
    part = shard(len(y), ctx)
    for gates in GATES:
        loss = F.cross_entropy(module(x[part], gates), y[part])
        optimizer.zero_grad(set_to_none=False)
        (loss * distributed.loss_weight(len(y[part]), len(y), ctx)).backward()
        optimizer.step()


def check(out: Path) -> None:
    ctx = distributed.init()
    torch.manual_seed(0)
    x, y = torch.randn(15, 8), torch.randint(0, 4, (15,))  # 15 = 8 + 7: an uneven split
    model = Toy()
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    train(model, distributed.wrap(model, torch.device("cpu"), ctx, sync_bn=False), ctx, x, y)
    train(reference, reference, SINGLE, x, y)

    params, ref, init = (dict(m.named_parameters()) for m in (model, reference, initial))
    report = {
        "world_size": ctx.world_size,
        "max_abs_diff_to_single_process": max((params[k] - ref[k]).abs().max().item() for k in params),
        # block 2 (index 1) is dropped in steps 2-4: its change there is weight decay + momentum only
        "dropped_block_moved": (params["blocks.1.branch.0.weight"] - init["blocks.1.branch.0.weight"]).abs().max().item(),
        "fingerprint": distributed.fingerprint(*params.values()),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(report))
