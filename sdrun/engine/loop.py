"""The training loop, top to bottom: data, model, optimiser, epochs, evaluation, outputs.

One call of `train(cfg, run_dir)` is one run. It writes into run_dir:
  events.out.tfevents.*  TensorBoard scalars, one point per epoch (sdrun.engine.tblog)
  by_step/               with eval_every_steps: TensorBoard error_by_step/* (x-axis: global step)
  metrics.jsonl          one JSON line per epoch
  evals.jsonl            with eval_every_steps: one JSON line per evaluation (sdrun.engine.evaluate)
  checkpoint.pt          the latest epoch's full training state (sdrun.engine.state)
  results.json           headline numbers at the end (sdrun.rundir)

The pieces, in the order a step uses them: `train_step` (one optimiser step; `sdrun bench`
times this same function), `train_epoch` (one pass over the batches, statistics kept on
the device), `train` (everything around the epochs).
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
from omegaconf import DictConfig
from tqdm import tqdm

from sdrun import fidelity
from sdrun.engine import distributed
from sdrun.data.build import build_run_data
from sdrun.config import to_plain
from sdrun.errors import UserError
from sdrun.engine.clock import EpochClock
from sdrun.engine.evaluate import Evaluator
from sdrun.files import append_jsonl, rewrite_jsonl, write_json
from sdrun.engine.gradstats import GradStats
from sdrun.model.resnet import model_for
from sdrun.engine.optim import make_optimizer, set_lr
from sdrun.rundir import FINISHED, HEADLINE, RESULTS
from sdrun.rng import derive_seed, seed_global
from sdrun.engine.runtime import (Runtime, autocast, device_info, fp32_math, resolve_runtime, software_versions,
                           synchronize)
from sdrun.engine.schedule import lr_at
from sdrun.engine.speed import apply_speed
from sdrun.engine.state import CHECKPOINT, SavedRun, TrainState
from sdrun.model.stochastic import GateSampler, expected_active_blocks
from sdrun.engine.tblog import RunBoard, log_epoch
from sdrun.ranks import Context, SINGLE

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

    def sum_over_ranks(self, ctx: Context) -> None:
        self.seen = int(distributed.sum_(torch.tensor([self.seen]), ctx).item())
        distributed.sum_(self.loss_sum, ctx)
        distributed.sum_(self.wrong, ctx)
        self.first_bad_step = distributed.first_step(self.first_bad_step, ctx)


def train_epoch(net, state: TrainState, rt: Runtime, ctx: Context, evaluator: Evaluator,
                grad_stats: GradStats, stop: "StopSignals", bar: tqdm | None = None) -> EpochStats:
    """One pass over the training batches (and the step evaluations due inside it).

    Stops early, at a step all ranks agree on, when a SIGTERM/SIGINT arrived (stop.received)."""
    batches, stats = state.batches, EpochStats.zeros(rt.device)
    state.model.train()
    for step, (x, y) in enumerate(batches, start=1):
        gates = state.gates.draw()
        weight = distributed.loss_weight(len(y), batches.global_batch_size(step), ctx) if ctx.distributed else 1.0
        loss, out = train_step(net, state.optimizer, x, y, gates, rt, weight, grad_stats)
        stats.add(step, loss, out, y, gates)
        if bar is not None:
            bar.update()
        # All ranks must stop at the same step; distributed, they agree every STOP_POLL steps.
        if ((not ctx.distributed or step % STOP_POLL == 0 or step == len(batches))
                and distributed.any_rank(stop.received is not None, ctx)):
            stop.received = stop.received or signal.SIGTERM
            break
        if evaluator.due_inside_epoch(step, len(batches), state.step + step):  # eval_every_steps
            evaluator.run(state.step + step, round(state.epoch + step / len(batches), 4), epoch_end=False)
            state.model.train()
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


# ---------------------------------------------------------------- the run

def run_training(cfg: DictConfig, run_dir: Path, saved: SavedRun | None, ctx: Context,
                 progress: bool) -> dict:
    """Data, model, optimiser, then the epochs; `saved`: the checkpoint to resume from, or None."""
    rt = resolve_runtime(cfg)
    rt.device = distributed.place(rt.device, ctx)
    seed_global(cfg.seed)

    data = build_run_data(cfg, rt.device, rt.channels_last, ctx)
    model = model_for(cfg).to(rt.device, memory_format=torch.channels_last if rt.channels_last
                              else torch.preserve_format)
    speed = apply_speed(model, cfg.speed, rt.device, ctx.world_size)  # eager | compile | graphs (sdrun.engine.speed)
    state = TrainState(model, make_optimizer(model, cfg.optim), GateSampler(model.survival_probs,
                       derive_seed(cfg.seed, "gates")), data.train_batches, data.normalizer)
    evaluator = Evaluator(lambda name: evaluate(model, data.eval_sets[name](), rt, ctx),
                          data.eval_sets["val"] is not None, cfg.eval_every_steps, cfg.dataset.top5, run_dir,
                          lambda: synchronize(rt.device), write=ctx.is_main, select_from=cfg.select_from)
    metrics_path = run_dir / "metrics.jsonl"
    if saved is not None:  # every piece of state the next step depends on comes back
        state.restore(saved)
        evaluator.best = state.best
        if ctx.is_main:  # drop lines of an epoch whose checkpoint was never written
            rewrite_jsonl(metrics_path, lambda r: r["epoch"] <= state.epoch)
            rewrite_jsonl(evaluator.path, lambda r: r["step"] <= state.step)
        log.info("resuming %s after epoch %d (step %d)", run_dir, state.epoch, state.step)

    # DDP around the model when distributed; checkpoints and evaluation use the bare model.
    net = distributed.wrap(model, rt.device, ctx, cfg.sync_bn)
    state.model = model = getattr(net, "module", net)
    board = RunBoard.open(cfg, run_dir, len(model.survival_probs), state.epoch, state.step, evaluator) \
        if ctx.is_main else None
    grad_stats = GradStats(model, enabled=cfg.log.grad_stats)  # after DDP's all-reduce: same on every rank
    expected_depth = expected_active_blocks(model.survival_probs)
    log_start(cfg, run_dir, model, rt, ctx, data, expected_depth)

    wall_start = time.perf_counter()
    clock = EpochClock(cfg.epochs, state.epoch, (state.last_record or {}).get("elapsed_s", 0.0))  # elapsed, ETA
    with StopSignals() as stop:
        for epoch in range(state.epoch, cfg.epochs):
            e = epoch + 1  # 1-based epoch number used in logs, metrics and TensorBoard
            lr = lr_at(epoch, cfg.optim)
            set_lr(state.optimizer, lr)
            synchronize(rt.device)
            t0, eval_s0 = time.perf_counter(), evaluator.seconds
            with tqdm(total=len(state.batches), desc=f"epoch {e}/{cfg.epochs}", postfix=clock.describe(),
                      leave=False, disable=not (progress and ctx.is_main)) as bar:
                stats = train_epoch(net, state, rt, ctx, evaluator, grad_stats, stop, bar)
            if stop.received is not None:
                # Abandon the partial epoch: resuming redoes it from the last checkpoint, which
                # keeps the numbers identical to an uninterrupted run.
                raise Interrupted(f"stopped by {signal.Signals(stop.received).name} in epoch {e}; "
                                  + (f"{run_dir / CHECKPOINT} holds epoch {epoch}. " if epoch and cfg.checkpoint
                                     else "no epoch was completed. ")
                                  + "Run the same command again to resume.", stop.received)
            synchronize(rt.device)
            epoch_time = time.perf_counter() - t0 - (evaluator.seconds - eval_s0)  # step evaluations excluded
            if ctx.distributed:
                # Same gates and data order on every rank, or the run is not the run it claims to be.
                distributed.check_identical("gates or data order", distributed.fingerprint(
                    torch.tensor([stats.gate_crc]), state.batches.generator.get_state()), ctx)
                stats.sum_over_ranks(ctx)
            check_finite(stats, e, state, run_dir, cfg.checkpoint)
            state.epoch, state.step = e, state.step + len(state.batches)
            state.train_time_s += epoch_time
            state.active_total += stats.active

            # ---- evaluation (excluded from the training time), best-val bookkeeping
            evaluated = evaluator.run(state.step, e, epoch_end=True)
            state.best = evaluator.best
            record = epoch_record(cfg, e, state.step, lr, stats, epoch_time, evaluated, grad_stats, epoch)
            record.update(clock.tick(e))  # elapsed_s, eta_s (wall clock)
            state.last_record = record
            if ctx.is_main:
                board.write_epoch(record, e, grad_stats)
                log_epoch(board.writer, record, expected_depth)  # flushes the event file
            log.info("epoch %d/%d | lr %.4g | train loss %.4f err %.2f%% | val %s | test %.2f%% | %.1fs %.0f img/s"
                     " | blocks %.2f/%.2f | %s", e, cfg.epochs, lr, record["train_loss"], record["train_error_pct"],
                     "-" if record["val_error_pct"] is None else f"{record['val_error_pct']:.2f}%",
                     record["test_error_pct"], epoch_time, record["images_per_s"], record["active_blocks_mean"],
                     expected_depth, clock.describe())
            # metrics.jsonl first, checkpoint second: a kill in between leaves a line that the
            # resumed run drops (it resumes from the previous checkpoint and redoes the epoch).
            if ctx.is_main:
                append_jsonl(metrics_path, record)
                if cfg.checkpoint:
                    state.save(run_dir / CHECKPOINT, to_plain(cfg))
            if distributed.any_rank(stop.received is not None, ctx):
                stop.received = stop.received or signal.SIGTERM
                raise Interrupted(f"stopped by {signal.Signals(stop.received).name} after epoch {e}; "
                                  f"run the same command again to resume.", stop.received)

    results = run_results(cfg, state, evaluator, rt, ctx, expected_depth, time.perf_counter() - wall_start, speed)
    if ctx.is_main:
        write_json(run_dir / RESULTS, results)
        board.close(results)
    log.info("done: test error %.2f%% at best val epoch %s (final %.2f%%), training time %.1fs",
             results[HEADLINE], results["best_val_epoch"], results["final_test_error_pct"], state.train_time_s)
    return results


# ---------------------------------------------------------------- the run's pieces

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


def check_finite(stats: EpochStats, e: int, state: TrainState, run_dir: Path, checkpointing: bool) -> None:
    bad = int(stats.first_bad_step.item())
    if bad >= 0:
        epoch = e - 1
        raise NonFiniteLoss(
            f"non-finite training loss at epoch {e}, step {bad} (global step {state.step + bad}); "
            + (f"the last good checkpoint is {run_dir / CHECKPOINT} (epoch {epoch})"
               if epoch and checkpointing else "no checkpoint was written"))


def epoch_record(cfg: DictConfig, e: int, step: int, lr: float, stats: EpochStats, epoch_time: float,
                 evaluated: dict, grad_stats: GradStats, epoch: int) -> dict:
    """The epoch's metrics.jsonl line (also what TensorBoard gets)."""
    record = {"epoch": e, "step": step, "lr": lr, "train_loss": stats.loss_sum.item() / stats.seen,
              "train_error_pct": 100.0 * stats.wrong.item() / stats.seen,
              "val_error_pct": evaluated["val_error_pct"], "test_error_pct": evaluated["test_error_pct"],
              "epoch_train_time_s": epoch_time, "images_per_s": stats.seen / epoch_time,
              "active_blocks_mean": stats.active / stats.steps}
    if cfg.dataset.top5:
        record.update({k: evaluated[k] for k in ("val_top5_error_pct", "test_top5_error_pct")})
    record.update(grad_stats.end_epoch(), lr_drop=epoch > 0 and lr < lr_at(epoch - 1, cfg.optim))
    return record


def run_results(cfg: DictConfig, state: TrainState, evaluator: Evaluator, rt: Runtime, ctx: Context,
                expected_depth: float, wall_time_s: float, speed: str) -> dict:
    """results.json (its keys: sdrun.rundir.KEYS)."""
    best, record = evaluator.best, state.last_record
    return {
        "status": FINISHED,
        "dataset": cfg.dataset.name, "depth": cfg.depth, "num_blocks": len(state.model.survival_probs),
        "pL": cfg.pL, "survival": cfg.survival.value, "seed": cfg.seed, "epochs": cfg.epochs,
        HEADLINE: best["test_error_pct"],
        "best_val_error_pct": best["val_error_pct"],
        "best_val_epoch": best["epoch"], "best_val_step": best["step"],
        "selection": "best_val" if evaluator.has_val else "last_epoch",
        "final_test_error_pct": record["test_error_pct"],
        "train_time_s": state.train_time_s, "train_time_per_epoch_s": state.train_time_s / cfg.epochs,
        "wall_time_s": wall_time_s,
        "expected_active_blocks": expected_depth,
        "measured_active_blocks": state.active_total / state.step,
        **({"test_top5_error_at_best_val_pct": best["test_top5_error_pct"],
            "final_test_top5_error_pct": record["test_top5_error_pct"]} if cfg.dataset.top5 else {}),
        "device": str(rt.device), "precision": rt.precision, "eval_precision": rt.eval_precision,
        "fp32_math": fp32_math() if rt.device.type == "cuda" else None, "hardware": device_info(rt.device),
        "channels_last": rt.channels_last, "speed": speed,
        "world_size": ctx.world_size, "cpu_threads": torch.get_num_threads(),
        "fidelity": fidelity.summary(cfg),  # which preset the paper-vs-reference choices match
        "config": to_plain(cfg), "versions": software_versions(),
    }


def log_start(cfg, run_dir, model, rt: Runtime, ctx, data, expected_depth: float) -> None:
    num_blocks = len(model.survival_probs)
    log.info("run dir %s | %s depth %d (L=%d blocks, %s params) pL=%s %s | device %s precision=%s (eval %s) "
             "channels_last=%s",
             run_dir, cfg.dataset.name, cfg.depth, num_blocks,
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", cfg.pL, cfg.survival.value,
             rt.device, rt.precision, rt.eval_precision, rt.channels_last)
    log.info("data: %d train / %d val / %d test images; expected active blocks %.2f of %d",
             len(data.train), len(data.val) if data.val else 0, len(data.test), expected_depth, num_blocks)
    if ctx.distributed:
        log.info("distributed: %d processes, global batch %d (about %d per process), sync_bn=%s",
                 ctx.world_size, cfg.batch_size, -(-cfg.batch_size // ctx.world_size), cfg.sync_bn)
