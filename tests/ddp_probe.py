"""Run `sdrun train` in this process (alone, or as one rank under torchrun) and record what
the trainer did: the gates of every step, every step's loss, batch size and number of
misclassified training images, and the final parameters and buffers, saved to
OUT_DIR/rank<RANK>.pt. Optionally SIGKILL the process right after its
N-th checkpoint write (rank 0 writes them; torchrun then stops the other ranks).

usage: python ddp_probe.py OUT_DIR KILL_AFTER_CHECKPOINT(0 = never) SDRUN_TRAIN_ARGS...
The real trainer runs unchanged; the probe only wraps functions to observe them.
"""

import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import sdrun.state
import sdrun.stochastic
import sdrun.train
from sdrun.cli import main

out_dir, kill_after, args = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
rank = int(os.environ.get("RANK", "0"))
record = {"gates": [], "loss": [], "batch": [], "wrong": []}
models = []

real_draw = sdrun.stochastic.GateSampler.draw
real_cross_entropy = F.cross_entropy
real_build_model = sdrun.train.model_for
real_save_checkpoint = sdrun.state.save_checkpoint
saves = [0]


def draw(self):
    gates = real_draw(self)
    record["gates"].append(list(gates))
    return gates


def cross_entropy(input, target, *a, **k):
    loss = real_cross_entropy(input, target, *a, **k)
    if torch.is_grad_enabled():  # training steps only
        record["loss"].append(loss.item())
        record["batch"].append(len(target))
        record["wrong"].append(int((input.detach().argmax(1) != target).sum()))
    return loss


def build_model(*a, **k):
    models.append(real_build_model(*a, **k))
    return models[-1]


def save_checkpoint(path, state):
    real_save_checkpoint(path, state)
    saves[0] += 1
    if saves[0] == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


sdrun.stochastic.GateSampler.draw = draw
F.cross_entropy = cross_entropy
sdrun.train.model_for = build_model
sdrun.state.save_checkpoint = save_checkpoint
try:
    main(["train", *args])
finally:
    out_dir.mkdir(parents=True, exist_ok=True)
    record["params"] = {n: p.detach().clone() for n, p in models[-1].named_parameters()} if models else {}
    record["state"] = {n: t.detach().clone() for n, t in models[-1].state_dict().items()} if models else {}
    torch.save(record, out_dir / f"rank{rank}.pt")
