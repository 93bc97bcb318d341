"""The training loop, top to bottom: `train_step`, `train_epoch`, then `fit` around the epochs.

`fit(run, run_dir)` trains a run built by sdrun.engine.setup.build_run from its state's epoch to
the last, and writes into run_dir (rank 0, through sdrun.engine.log.RunLog):
  events.out.tfevents.*  TensorBoard scalars, one point per epoch (sdrun.engine.tblog)
  by_step/               with eval_every_steps: TensorBoard error_by_step/* (x-axis: global step)
  metrics.jsonl          one JSON line per epoch
  evals.jsonl            with eval_every_steps: one JSON line per evaluation (sdrun.engine.evaluate)
  checkpoint.pt          the latest epoch's full training state (sdrun.engine.state)
  results.json           headline numbers at the end (sdrun.rundir)

`train_step` is one optimiser step (`sdrun bench` and `check=true` time this same function);
`train_epoch` one pass over the batches, its statistics kept on the device until the epoch ends.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sdrun import fidelity
from sdrun.config import to_plain
from sdrun.engine import distributed
from sdrun.engine.clock import EpochClock
from sdrun.engine.evaluate import Evaluator, evaluate
from sdrun.engine.gradstats import GradStats
from sdrun.engine.log import RunLog
from sdrun.engine.optim import set_lr
from sdrun.engine.schedule import lr_at
from sdrun.engine.runtime import Runtime, autocast, device_info, fp32_math, software_versions, synchronize
from sdrun.engine.setup import Run
from sdrun.engine.state import TrainState
from sdrun.rundir import CHECKPOINT
from sdrun.errors import UserError
from sdrun.ranks import Context
from sdrun.rundir import FINISHED, HEADLINE

log = logging.getLogger("sdrun")

STOP_POLL = 10  # distributed: steps between the ranks' agreement on a SIGTERM/SIGINT


# ---------------------------------------------------------------- one step, one epoch

def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               gates: list[bool], rt: Runtime, loss_weight: float = 1.0,
               grad_stats: GradStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on the sub-network `gates` selects; returns (loss, logits), detached, on the device.

    `loss_weight` scales the loss before backward (DDP: so that the average over ranks is the
    gradient of the global batch's mean loss). Gradients are zeroed in place, never set to
    None, so a dropped block still gets weight decay and momentum (sdrun.engine.optim).
    """
    with autocast(rt):
        out = net(x, gates)
        loss = F.cross_entropy(out, y)
    optimizer.zero_grad(set_to_none=False)
    (loss * loss_weight if loss_weight != 1.0 else loss).backward()
    if grad_stats is not None:
        grad_stats.record(gates)  # device-side accumulation, no sync
    optimizer.step()
    return loss.detach().float(), out.detach()


@dataclass
class EpochStats:
    """One epoch's training statistics; the tensors stay on the device until read."""
    loss_sum: torch.Tensor         # sum over images of the loss
    wrong: torch.Tensor            # misclassified training images (the sub-network's own prediction)
    first_bad_step: torch.Tensor   # first 1-based step with a non-finite loss, -1 if none
    seen: int = 0                  # images
    active: int = 0                # blocks run, summed over steps
    gate_crc: int = 0              # fingerprint of the gates drawn (distributed consistency check)
    steps: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> "EpochStats":
        return cls(torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device),
                   torch.full((), -1, dtype=torch.int64, device=device))

    def add(self, step: int, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, gates: list[bool]) -> None:
        # Remember the first step with a non-finite loss without syncing; checked after the epoch.
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss), step, self.first_bad_step)
        self.loss_sum += loss * len(y)
        self.wrong += (out.argmax(1) != y).sum()
        self.seen += len(y)
        self.active += sum(gates)
        self.gate_crc = zlib.crc32(bytes(gates), self.gate_crc)
        self.steps = step

    def combine_ranks(self, run: Run) -> None:
        """Distributed: check that every rank drew the same gates and data order (or the run is
        not the run it claims to be), then sum the counts over the ranks."""
        ctx = run.ctx
        if not ctx.distributed:
            return
        distributed.check_identical("gates or data order", distributed.fingerprint(
            torch.tensor([self.gate_crc]), run.state.batches.generator.get_state()), ctx)
        self.seen = int(distributed.sum_(torch.tensor([self.seen]), ctx).item())
        distributed.sum_(self.loss_sum, ctx)
        distributed.sum_(self.wrong, ctx)
        self.first_bad_step = distributed.first_step(self.first_bad_step, ctx)


def train_epoch(run: Run, evaluator: Evaluator, runlog: RunLog, stop: "StopSignals",
                bar: tqdm | None = None) -> EpochStats:
    """One pass over the training batches (and the step evaluations due inside it).

    Stops early, at a step all ranks agree on, when a SIGTERM/SIGINT arrived (stop.received)."""
    state, ctx, batches = run.state, run.ctx, run.state.batches
    stats = EpochStats.zeros(run.rt.device)
    run.model.train()
    for step, (x, y) in enumerate(batches, start=1):
        gates = state.gates.draw()
        weight = distributed.loss_weight(len(y), batches.global_batch_size(step), ctx) if ctx.distributed else 1.0
        loss, out = train_step(run.net, state.optimizer, x, y, gates, run.rt, weight, run.grad_stats)
        stats.add(step, loss, out, y, gates)
        if bar is not None:
            bar.update()
        # All ranks must stop at the same step; distributed, they agree every STOP_POLL steps.
        if (not ctx.distributed or step % STOP_POLL == 0 or step == len(batches)) and stop.agreed(ctx):
            break
        if evaluator.due_inside_epoch(step, len(batches), state.step + step):  # eval_every_steps
            runlog.evaluation(evaluator.run(state.step + step, round(state.epoch + step / len(batches), 4),
                                            epoch_end=False))
            run.model.train()
    return stats


# ---------------------------------------------------------------- stopping

class Interrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; the last completed epoch's checkpoint is on disk."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class NonFiniteLoss(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class StopSignals:
    """Turn SIGTERM/SIGINT (preemption, Ctrl-C) into a flag the loop checks between steps."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, ctx: Context) -> bool:
        """Whether any rank received a signal (every rank gets the same answer); the run stops."""
        if distributed.any_rank(self.received is not None, ctx):
            self.received = self.received or signal.SIGTERM
            return True
        return False


# ---------------------------------------------------------------- the run

def fit(run: Run, run_dir: Path, progress: bool = False) -> dict:
    """Train `run` from its state's epoch to the last; returns results.json's content."""
    cfg, state, rt, ctx = run.cfg, run.state, run.rt, run.ctx
    evaluator = Evaluator(lambda split: evaluate(run.model, run.data.eval_sets[split](), rt, ctx),
                          run.data.eval_sets["val"] is not None, cfg.eval_every_steps, cfg.dataset.top5,
                          lambda: synchronize(rt.device), cfg.select_from, best=state.best)
    lowest = LowestTest(state.best, resumed=state.epoch > 0)
    runlog = RunLog(run, run_dir)
    clock = EpochClock(cfg.epochs, state.epoch, (state.last_record or {}).get("elapsed_s", 0.0))  # elapsed, ETA
    wall_start = time.perf_counter()
    with StopSignals() as stop:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):  # 1-based, as logs, metrics and TensorBoard count
            lr = lr_at(epoch - 1, cfg.optim)
            set_lr(state.optimizer, lr)
            synchronize(rt.device)
            t0, eval_s0 = time.perf_counter(), evaluator.seconds
            with tqdm(total=len(state.batches), desc=f"epoch {epoch}/{cfg.epochs}", postfix=clock.describe(),
                      leave=False, disable=not (progress and ctx.is_main)) as bar:
                stats = train_epoch(run, evaluator, runlog, stop, bar)
            if stop.received is not None:
                # Abandon the partial epoch: resuming redoes it from the last checkpoint, which
                # keeps the numbers identical to an uninterrupted run.
                raise Interrupted(f"stopped by {signal.Signals(stop.received).name} in epoch {epoch}; "
                                  + (f"{run_dir / CHECKPOINT} holds epoch {epoch - 1}. "
                                     if epoch > 1 and cfg.checkpoint else "no epoch was completed. ")
                                  + "Run the same command again to resume.", stop.received)
            synchronize(rt.device)
            train_s = time.perf_counter() - t0 - (evaluator.seconds - eval_s0)  # step evaluations excluded
            stats.combine_ranks(run)
            check_finite(stats, epoch, state, run_dir, cfg.checkpoint)
            state.epoch, state.step = epoch, state.step + len(state.batches)
            state.train_time_s += train_s
            state.active_total += stats.active

            evaluated = evaluator.run(state.step, epoch, epoch_end=True)  # excluded from the training time
            lowest.see(evaluated["test_error_pct"], epoch)
            runlog.evaluation(evaluated)
            state.last_record = epoch_record(run, epoch, lr, stats, train_s, evaluated) | clock.tick(epoch)
            runlog.epoch(state.last_record, clock.describe())  # metrics.jsonl, TensorBoard, console
            if cfg.checkpoint and ctx.is_main:  # after metrics.jsonl: a kill in between redoes the epoch
                state.save(run_dir / CHECKPOINT, to_plain(cfg))
            if stop.agreed(ctx):
                raise Interrupted(f"stopped by {signal.Signals(stop.received).name} after epoch {epoch}; "
                                  f"run the same command again to resume.", stop.received)
    results = run_results(run, evaluator, time.perf_counter() - wall_start, lowest)
    runlog.finish(results, state.train_time_s)
    return results


# ---------------------------------------------------------------- the run's pieces

class LowestTest:
    """The lowest test error over the epoch-end evaluations and its epoch (the first, on a tie):
    fb.resnet.torch's "best top1" (main.lua keeps `bestTop1` when `testTop1 < bestTop1` and prints
    it at the end), results.json's `best_test_error_pct` / `best_test_epoch`.

    Selected on the test set, so not a valid selection where there is a validation set (CIFAR,
    SVHN: the headline is the test error at the best-validation evaluation); kept for every run
    because it is cheap, and for ImageNet, whose fb.resnet.torch "val" set is sdrun's test set.
    Kept in the run's checkpointed `best` dict so a resumed run ends with the same numbers; a run
    resumed from a checkpoint written before sdrun kept it cannot know, and reports None."""

    KEY = "lowest_test"  # [error %, epoch] in `best`; absent after a resume from an older checkpoint

    def __init__(self, best: dict, resumed: bool):
        self.best = best
        if not resumed:
            best.setdefault(self.KEY, [None, None])

    def see(self, test_error_pct: float | None, epoch: int) -> None:
        lowest = self.best.get(self.KEY)
        if lowest is not None and test_error_pct is not None and (lowest[0] is None or test_error_pct < lowest[0]):
            self.best[self.KEY] = [test_error_pct, epoch]

    def results(self) -> dict:
        error, epoch = self.best.get(self.KEY) or (None, None)
        return {"best_test_error_pct": error, "best_test_epoch": epoch}


def check_finite(stats: EpochStats, epoch: int, state: TrainState, run_dir: Path, checkpointing: bool) -> None:
    bad = int(stats.first_bad_step.item())
    if bad >= 0:
        raise NonFiniteLoss(
            f"non-finite training loss at epoch {epoch}, step {bad} (global step {state.step + bad}); "
            + (f"the last good checkpoint is {run_dir / CHECKPOINT} (epoch {epoch - 1})"
               if epoch > 1 and checkpointing else "no checkpoint was written"))


def epoch_record(run: Run, epoch: int, lr: float, stats: EpochStats, train_s: float, evaluated: dict) -> dict:
    """The epoch's metrics.jsonl line (also what TensorBoard gets); the clock's fields come after."""
    cfg = run.cfg
    record = {"epoch": epoch, "step": run.state.step, "lr": lr, "train_loss": stats.loss_sum.item() / stats.seen,
              "train_error_pct": 100.0 * stats.wrong.item() / stats.seen,
              "val_error_pct": evaluated["val_error_pct"], "test_error_pct": evaluated["test_error_pct"],
              "epoch_train_time_s": train_s, "images_per_s": stats.seen / train_s,
              "active_blocks_mean": stats.active / stats.steps}
    if cfg.dataset.top5:
        record.update({k: evaluated[k] for k in ("val_top5_error_pct", "test_top5_error_pct")})
    record.update(run.grad_stats.end_epoch(), lr_drop=epoch > 1 and lr < lr_at(epoch - 2, cfg.optim))
    return record


def run_results(run: Run, evaluator: Evaluator, wall_time_s: float, lowest: LowestTest) -> dict:
    """results.json (its keys: sdrun.rundir.RESULTS_KEYS)."""
    cfg, state, rt = run.cfg, run.state, run.rt
    best, record = evaluator.best, state.last_record
    return {
        "status": FINISHED,
        "dataset": cfg.dataset.name, "depth": cfg.depth, "num_blocks": len(run.model.survival_probs),
        "pL": cfg.pL, "survival": cfg.survival.value, "seed": cfg.seed, "epochs": cfg.epochs,
        HEADLINE: best["test_error_pct"],
        "best_val_error_pct": best["val_error_pct"],
        "best_val_epoch": best["epoch"], "best_val_step": best["step"],
        "selection": "best_val" if evaluator.has_val else "last_epoch",
        "final_test_error_pct": record["test_error_pct"],
        **lowest.results(),  # best_test_error_pct, best_test_epoch: selected on the test set (LowestTest)
        "train_time_s": state.train_time_s, "train_time_per_epoch_s": state.train_time_s / cfg.epochs,
        "wall_time_s": wall_time_s,
        "expected_active_blocks": run.expected_depth,
        "measured_active_blocks": state.active_total / state.step,
        **({"test_top5_error_at_best_val_pct": best["test_top5_error_pct"],
            "final_test_top5_error_pct": record["test_top5_error_pct"]} if cfg.dataset.top5 else {}),
        "device": str(rt.device), "precision": rt.precision, "eval_precision": rt.eval_precision,
        "fp32_math": fp32_math() if rt.device.type == "cuda" else None, "hardware": device_info(rt.device),
        "channels_last": rt.channels_last, "speed": run.speed,
        "world_size": run.ctx.world_size, "cpu_threads": torch.get_num_threads(),
        "fidelity": fidelity.summary(cfg),  # which preset the paper-vs-reference choices match
        "config": to_plain(cfg), "versions": software_versions(),
    }
