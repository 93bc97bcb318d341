"""Evaluation points and the best-validation selection (the paper's protocol).

A run evaluates at the end of every epoch and, with eval_every_steps = N, also after every
N-th training step (the paper checks SVHN's validation error every 200 iterations, about
24 times an epoch). The selected evaluation is the first one with the lowest validation
error; its test error is the run's headline number. Without a validation set the latest
evaluation is the selected one.

Which evaluations compete (select_from, with eval_every_steps only): `steps` (the
reference, main.lua's `accounting` every 200 iterations and never at an epoch end) lets
only the evaluations at multiples of eval_every_steps global steps be selected; an epoch
end still evaluates for the per-epoch curves but is a candidate only when its step is such
a multiple (or before the first step evaluation, so that a run shorter than
eval_every_steps steps still selects something). `steps_and_epochs` makes every epoch end a
candidate too.

Test errors are always measured at epoch ends (the per-epoch curves). At a step inside an
epoch the test set is only evaluated when the validation error is a new best: that is the
only test number the protocol uses, and it spares evaluating SVHN's 26k test images every
200 steps.

With eval_every_steps, every evaluation's record (epoch ends included) goes to `evals.jsonl`
and to TensorBoard's `error_by_step/*` (sdrun.engine.log); `metrics.jsonl` stays one line per
epoch.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from sdrun.engine import distributed
from sdrun.engine.runtime import Runtime, autocast
from sdrun.ranks import SINGLE, Context


@torch.inference_mode()
def evaluate(model, batches, rt: Runtime, ctx: Context = SINGLE) -> tuple[float, float]:
    """Top-1 and top-5 error (%) of the test-time network (every branch scaled by p_l).

    Distributed: `batches` is this rank's slice of the split; every rank evaluates rank 0's
    model (its BatchNorm statistics are the checkpointed ones) and the counts are summed.
    """
    distributed.broadcast_buffers(model, ctx)
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=rt.device)  # top-1 wrong, top-5 wrong, seen
    for x, y in batches:
        with autocast(rt, eval=True):
            out = model(x)
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        counts[0] += (top[:, 0] != y).sum()
        counts[1] += (top != y[:, None]).all(1).sum()
        counts[2] += len(y)
    wrong1, wrong5, count = distributed.sum_(counts, ctx).tolist()
    return 100.0 * wrong1 / max(count, 1), 100.0 * wrong5 / max(count, 1)


class Evaluator:
    """Runs the evaluations of one run and keeps the selected one in `best`.

    `best` is the run's own dict (TrainState.best, checkpointed), updated in place, so the
    selection lives in one place. Evaluations return their record; writing it is the caller's
    (sdrun.engine.log.RunLog)."""

    def __init__(self, error_of: Callable[[str], tuple[float, float]], has_val: bool,
                 every_steps: int | None, top5: bool, sync: Callable[[], None],
                 select_from: str = "steps_and_epochs", best: dict | None = None):
        self.error_of = error_of  # "val" | "test" -> (top-1 error %, top-5 error %)
        self.has_val, self.every_steps, self.top5 = has_val, every_steps, top5
        self.sync = sync
        self.best = {} if best is None else best
        if not self.best:  # a new run: nothing selected yet
            self.best.update({"val_error_pct": math.inf if has_val else None, "epoch": None, "step": None,
                              "test_error_pct": None, "test_top5_error_pct": None})
        self.seconds = 0.0  # wall time spent evaluating, so the caller can leave it out of training time
        self.epochs_compete = str(select_from) == "steps_and_epochs"

    def is_candidate(self, step: int, epoch_end: bool) -> bool:
        """May the evaluation at global `step` be selected (see the module's docstring)?"""
        if self.every_steps is None or not epoch_end or self.epochs_compete:
            return True
        # Before global step eval_every_steps no step evaluation has run yet (stateless, so a
        # resumed run decides the same way).
        return step % self.every_steps == 0 or step < self.every_steps

    def due_inside_epoch(self, step_in_epoch: int, steps_in_epoch: int, step: int) -> bool:
        """A step evaluation is due (the epoch's last step is left to the epoch-end evaluation)."""
        return self.every_steps is not None and step % self.every_steps == 0 and step_in_epoch < steps_in_epoch

    def run(self, step: int, epoch: float, epoch_end: bool) -> dict:
        """Evaluate the test-time network at global `step` (`epoch`: epochs completed, fractional
        inside an epoch) and update the selection. Returns the evaluation's record."""
        self.sync()
        t0 = time.perf_counter()
        val = self.error_of("val") if self.has_val else (None, None)
        new_best = val[0] is None or (val[0] < self.best["val_error_pct"] and self.is_candidate(step, epoch_end))
        test = self.error_of("test") if new_best or epoch_end else (None, None)
        if new_best:
            self.best.update({"val_error_pct": val[0], "epoch": epoch, "step": step,
                              "test_error_pct": test[0], "test_top5_error_pct": test[1] if self.top5 else None})
        self.seconds += time.perf_counter() - t0

        record = {"step": step, "epoch": epoch, "val_error_pct": val[0], "test_error_pct": test[0]}
        if self.top5:
            record.update(val_top5_error_pct=val[1], test_top5_error_pct=test[1])
        record["best_val_error_pct"] = self.best["val_error_pct"]
        return record
