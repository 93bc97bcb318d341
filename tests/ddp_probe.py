"""Run `sdrun train` (alone, or as one rank under torchrun) and record what the trainer did:
the gates of every step, every step's loss, batch size and number of misclassified training
images, and the final parameters and buffers, saved to OUT_DIR/rank<RANK>.pt. Optionally
SIGKILL the process right after its N-th checkpoint write (rank 0 writes them; torchrun then
stops the other ranks).

usage: python ddp_probe.py OUT_DIR KILL_AFTER_CHECKPOINT(0 = never) SDRUN_TRAIN_ARGS...
The real trainer runs unchanged; the probe only wraps functions to observe them. With
DDP_TOY_OUT=DIR in the environment, tests/ddp_toy.py's check runs first, in the same
process group.
`recording(OUT_DIR)` does the same around a run in the calling process (the one-process
reference of tests/test_distributed.py), and puts the functions back afterwards.
"""

import contextlib
import gc
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import sdrun.engine.state
import sdrun.model.stochastic
import sdrun.engine.setup


@contextlib.contextmanager
def recording(out_dir: Path, kill_after: int = 0):
    rank = int(os.environ.get("RANK", "0"))
    record = {"gates": [], "loss": [], "batch": [], "wrong": []}
    models, saves = [], [0]
    real = {"draw": sdrun.model.stochastic.GateSampler.draw, "cross_entropy": F.cross_entropy,
            "model_for": sdrun.engine.setup.model_for, "save_checkpoint": sdrun.engine.state.save_checkpoint}

    def draw(self):
        gates = real["draw"](self)
        record["gates"].append(list(gates))
        return gates

    def cross_entropy(input, target, *a, **k):
        loss = real["cross_entropy"](input, target, *a, **k)
        if torch.is_grad_enabled():  # training steps only
            record["loss"].append(loss.item())
            record["batch"].append(len(target))
            record["wrong"].append(int((input.detach().argmax(1) != target).sum()))
        return loss

    def model_for(*a, **k):
        models.append(real["model_for"](*a, **k))
        return models[-1]

    def save_checkpoint(path, state):
        real["save_checkpoint"](path, state)
        saves[0] += 1
        if saves[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    sdrun.model.stochastic.GateSampler.draw = draw
    F.cross_entropy = cross_entropy
    sdrun.engine.setup.model_for = model_for
    sdrun.engine.state.save_checkpoint = save_checkpoint
    try:
        yield
    finally:
        sdrun.model.stochastic.GateSampler.draw = real["draw"]
        F.cross_entropy = real["cross_entropy"]
        sdrun.engine.setup.model_for = real["model_for"]
        sdrun.engine.state.save_checkpoint = real["save_checkpoint"]
        out_dir.mkdir(parents=True, exist_ok=True)
        record["params"] = {n: p.detach().clone() for n, p in models[-1].named_parameters()} if models else {}
        record["state"] = {n: t.detach().clone() for n, t in models[-1].state_dict().items()} if models else {}
        torch.save(record, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    from sdrun.cli import main

    if os.environ.get("DDP_TOY_OUT"):
        from tests import ddp_toy
        ddp_toy.check(Path(os.environ["DDP_TOY_OUT"]))  # leaves the process group up for the run
    try:
        with recording(Path(sys.argv[1]), int(sys.argv[2])):
            main(["train", *sys.argv[3:]])
    finally:
        gc.freeze()  # exit without the last garbage collection (~1 s), as the console script does
