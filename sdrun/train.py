"""The training loop, top to bottom: data, model, optimiser, epochs, evaluation, outputs.

One call of `train(cfg, run_dir)` is one run. It writes into run_dir:
  events.out.tfevents.*  TensorBoard scalars, one point per epoch
  by_step/               with eval_every_steps: TensorBoard error_by_step/* (x-axis: global step)
  metrics.jsonl          one JSON line per epoch
  evals.jsonl            with eval_every_steps: one JSON line per evaluation (sdrun.evaluation)
  checkpoint.pt          the latest epoch's full training state (weights_only-loadable)
  results.json           headline numbers at the end (the paper's protocol), config, versions
"""

from __future__ import annotations

import logging
import platform
import random
import signal
import threading
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from sdrun import distributed
from sdrun.cifar_loader import make_train_batches
from sdrun.config import ConfigError, Toggle, device_problem, to_plain, validate
from sdrun.data import Normalizer, eval_batches, load_image_data
from sdrun.evaluation import Evaluator
from sdrun.gradstats import GradStats
from sdrun.io import append_jsonl, rewrite_jsonl, save_checkpoint, write_json
from sdrun.models import build_model
from sdrun.optim import make_optimizer  # noqa: F401 (re-exported: sdrun.train.make_optimizer)
from sdrun.rng import derive_seed, seed_global
from sdrun.runs import CHECKPOINT, check_run_dir
from sdrun.speed import apply_speed
from sdrun.stochastic import GateSampler, expected_active_blocks
from sdrun.tblog import RunBoard

log = logging.getLogger("sdrun")

STOP_POLL = 10  # distributed: steps between the ranks' agreement on a SIGTERM/SIGINT


@dataclass
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool


def resolve_runtime(cfg: DictConfig) -> Runtime:
    """Turn 'auto' settings into concrete ones for the device at hand."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if device_problem(cfg.device):
            raise ConfigError(device_problem(cfg.device))
        device = torch.device(cfg.device)
    on_cuda = device.type == "cuda"
    bf16 = {Toggle.on: True, Toggle.off: False,
            Toggle.auto: on_cuda and torch.cuda.is_bf16_supported()}[cfg.bf16]
    # channels_last: faster for convolutions on CUDA tensor cores, and measured faster on the
    # CPU too (`sdrun bench --sections layout`: ResNet-110 training step x1.49 with oneDNN on
    # the 2-core AMD EPYC dev machine), so `auto` means on for both.
    channels_last = {Toggle.on: True, Toggle.off: False, Toggle.auto: True}[cfg.channels_last]
    if on_cuda:
        torch.backends.cudnn.benchmark = not cfg.deterministic
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return Runtime(device, bf16 and on_cuda, channels_last)


def lr_at(epoch: int, optim: DictConfig) -> float:
    """Step schedule: lr x gamma^(number of milestones <= epoch); warm-up lr before warmup_epochs.

    `epoch` counts from 0, so milestones [250, 375] give lr 0.1 for epochs 0..249 (the
    paper's first 250 epochs), 0.01 for 250..374, 0.001 after.
    """
    if epoch < optim.warmup_epochs:
        return optim.warmup_lr
    return optim.lr * optim.gamma ** sum(epoch >= m for m in optim.milestones)


@torch.inference_mode()
def evaluate(model, batches, rt: Runtime, ctx: distributed.Context = distributed.SINGLE) -> tuple[float, float]:
    """Top-1 and top-5 error (%) of the test-time network (every branch scaled by p_l).

    Distributed: `batches` is this rank's slice of the split; the counts are summed over ranks.
    """
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=rt.device)  # top-1 wrong, top-5 wrong, seen
    for x, y in batches:
        with autocast(rt):
            out = model(x)
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        counts[0] += (top[:, 0] != y).sum()
        counts[1] += (top != y[:, None]).all(1).sum()
        counts[2] += len(y)
    wrong1, wrong5, count = distributed.sum_(counts, ctx).tolist()
    return 100.0 * wrong1 / max(count, 1), 100.0 * wrong5 / max(count, 1)


def autocast(rt: Runtime):
    return torch.autocast("cuda", dtype=torch.bfloat16) if rt.bf16 else nullcontext()


def software_versions() -> dict:
    import hydra
    import omegaconf
    import torchvision

    from sdrun import __version__
    return {"sdrun": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "hydra": hydra.__version__,
            "omegaconf": omegaconf.__version__, "cuda": torch.version.cuda,
            "platform": platform.platform()}


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; the last completed epoch's checkpoint is on disk."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


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


def rng_state() -> dict:
    """Every global RNG a run could touch (python, numpy, torch CPU and CUDA), weights_only-safe."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: DictConfig, run_dir: str | Path, progress: bool = False) -> dict:
    validate(cfg)
    ctx = distributed.init()  # torchrun's rank and world size; one process without torchrun
    if cfg.batch_size < ctx.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is the global batch; it must be at least "
                          f"the number of processes ({ctx.world_size})")
    if ctx.distributed and cfg.dataset.name != "imagenet" and str(cfg.dataset.loader) != "device":
        # The device path and ImageNet's loader shard each global batch; the CIFAR DataLoader path does not.
        raise ConfigError("torchrun runs use dataset.loader=device for cifar10, cifar100, svhn and digits "
                          "(dataset.loader=dataloader does not shard its batches across processes)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_state = check_run_dir(run_dir, cfg)  # None for a new run; raises if finished or foreign
    rt = resolve_runtime(cfg)
    rt.device = distributed.place(rt.device, ctx)
    seed_global(cfg.seed)

    # ---- data: uint8 on the device, normalised and augmented per batch there (or, with
    # dataset.loader=dataloader, a DataLoader with torchvision transforms); ImageNet is
    # decoded from JPEGs per batch by DataLoader workers instead (sdrun.imagenet)
    if cfg.dataset.name == "imagenet":
        from sdrun.imagenet import load_imagenet
        data = load_imagenet(cfg, rt.device, rt.channels_last, ctx)
        normalizer, batches, eval_sets = data.normalizer, data.train_batches, data.eval_sets
    else:
        data = load_image_data(cfg.dataset, cfg.seed)
        normalizer = Normalizer.fit(data.train.images)
        batches = make_train_batches(cfg, data.train, normalizer, rt.device, rt.channels_last,
                                     ctx.rank, ctx.world_size)
        normalizer = normalizer.to(rt.device)
        # Evaluation is sharded across ranks (each counts its slice; the counts are summed).
        val_part, test_part = (None if s is None else s.part(distributed.shard(len(s), ctx)).to(rt.device)
                               for s in (data.val, data.test))

        def passes(split):  # a fresh pass over an evaluation split on each call; None without the split
            return None if split is None else lambda: eval_batches(split, normalizer, cfg.eval_batch_size,
                                                                   rt.channels_last)
        eval_sets = {"val": passes(val_part), "test": passes(test_part)}

    # ---- model, optimiser, gates
    model = build_model(cfg.model.arch, cfg.depth, cfg.dataset.num_classes, cfg.pL,
                        cfg.survival.value, cfg.model.scaling.value, cfg.model.shortcut_pool)
    model = model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    speed = apply_speed(model, cfg.speed, rt.device, ctx.world_size)  # eager | compile | graphs (sdrun.speed)
    optimizer = make_optimizer(model, cfg.optim)
    gates = GateSampler(model.survival_probs, derive_seed(cfg.seed, "gates"))
    num_blocks = len(model.survival_probs)
    expected_depth = expected_active_blocks(model.survival_probs)

    start_epoch, train_time, active_total, steps_total, record = 0, 0.0, 0, 0, None
    metrics_path = run_dir / "metrics.jsonl"
    sync = (lambda: torch.cuda.synchronize(rt.device)) if rt.device.type == "cuda" else (lambda: None)
    evaluator = Evaluator(lambda name: evaluate(model, eval_sets[name](), rt, ctx), eval_sets["val"] is not None,
                          cfg.eval_every_steps, cfg.dataset.top5, run_dir, sync, write=ctx.is_main)
    if resume_state is not None:
        # Continue exactly where the last completed epoch left off: every piece of state that
        # the next step depends on comes back, so the numbers match an uninterrupted run.
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        gates.load_state_dict(resume_state["gates"])
        batches.load_state_dict(resume_state["data"])
        set_rng_state(resume_state["rng"])
        evaluator.best, record = resume_state["best"], resume_state["last_record"]
        start_epoch, steps_total = resume_state["epoch"], resume_state["step"]
        train_time, active_total = resume_state["train_time_s"], resume_state["active_total"]
        # The jsonl files may hold lines of an epoch whose checkpoint was never written: drop them.
        if ctx.is_main:
            rewrite_jsonl(metrics_path, lambda r: r["epoch"] <= start_epoch)
            rewrite_jsonl(evaluator.path, lambda r: r["step"] <= steps_total)
        log.info("resuming %s after epoch %d (step %d)", run_dir, start_epoch, steps_total)

    # The module trained: DDP around the model when distributed (the model itself otherwise).
    # Checkpoints and evaluation use the bare model, so its state_dict keys never change.
    net = distributed.wrap(model, rt.device, ctx, cfg.sync_bn)
    model = getattr(net, "module", net)

    from torch.utils.tensorboard import SummaryWriter
    # purge_step hides points a killed attempt logged after the checkpoint (x-axis: epochs).
    writer = board = None
    if ctx.is_main:  # only rank 0 writes
        writer = SummaryWriter(str(run_dir), purge_step=start_epoch + 1 if start_epoch else None)
        if cfg.eval_every_steps:  # step-axis curves in their own event file, purged by step on resume
            evaluator.writer = SummaryWriter(str(run_dir / "by_step"),
                                             purge_step=steps_total + 1 if steps_total else None)
        board = RunBoard(writer, num_blocks, cfg.log.grad_histograms_every)
        board.start(cfg)
    grad_stats = GradStats(model, enabled=cfg.log.grad_stats)  # after DDP's all-reduce: same on every rank
    log.info("run dir %s | %s depth %d (L=%d blocks, %s params) pL=%s %s | device %s bf16=%s channels_last=%s",
             run_dir, cfg.dataset.name, cfg.depth, num_blocks,
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", cfg.pL, cfg.survival.value,
             rt.device, rt.bf16, rt.channels_last)
    log.info("data: %d train / %d val / %d test images; expected active blocks %.2f of %d",
             len(data.train), len(data.val) if data.val else 0, len(data.test), expected_depth, num_blocks)
    if ctx.distributed:
        log.info("distributed: %d processes, global batch %d (about %d per process), sync_bn=%s",
                 ctx.world_size, cfg.batch_size, -(-cfg.batch_size // ctx.world_size), cfg.sync_bn)

    wall_start = time.perf_counter()
    with StopSignals() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            e = epoch + 1  # 1-based epoch number used in logs, metrics and TensorBoard
            lr = lr_at(epoch, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # ---- one training epoch; statistics accumulate on the device (no per-step sync)
            model.train()
            loss_sum = torch.zeros((), device=rt.device)
            wrong = torch.zeros((), dtype=torch.int64, device=rt.device)
            first_bad_step = torch.full((), -1, dtype=torch.int64, device=rt.device)
            seen, active, gate_crc = 0, 0, 0
            sync()
            t0, eval_s0 = time.perf_counter(), evaluator.seconds
            bar = tqdm(batches, desc=f"epoch {e}/{cfg.epochs}", leave=False, disable=not (progress and ctx.is_main))
            for step, (x, y) in enumerate(bar, start=1):
                step_gates = gates.draw()
                with autocast(rt):
                    out = net(x, step_gates)
                    loss = F.cross_entropy(out, y)
                optimizer.zero_grad(set_to_none=False)
                if ctx.distributed:  # DDP averages over ranks: weight so the result is the global mean's gradient
                    (loss * distributed.loss_weight(len(y), batches.global_batch_size(step), ctx)).backward()
                else:
                    loss.backward()
                grad_stats.record(step_gates)  # device-side accumulation, no sync
                optimizer.step()
                loss = loss.detach().float()
                # Remember the first step with a non-finite loss without syncing; checked below.
                first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss),
                                             step, first_bad_step)
                loss_sum += loss * len(y)
                wrong += (out.detach().argmax(1) != y).sum()
                seen += len(y)
                active += sum(step_gates)
                gate_crc = zlib.crc32(bytes(step_gates), gate_crc)
                # All ranks must stop at the same step; distributed, they agree every STOP_POLL steps.
                if ((not ctx.distributed or step % STOP_POLL == 0 or step == len(batches))
                        and distributed.any_rank(stop.received is not None, ctx)):
                    stop.received = stop.received or signal.SIGTERM
                    break
                if evaluator.due_inside_epoch(step, len(batches), steps_total + step):  # eval_every_steps
                    evaluator.run(steps_total + step, round(epoch + step / len(batches), 4), epoch_end=False)
                    model.train()
            bar.close()
            if stop.received is not None:
                # Abandon the partial epoch: resuming redoes it from the last checkpoint, which
                # keeps the numbers identical to an uninterrupted run.
                raise Interrupted(f"stopped by {signal.Signals(stop.received).name} in epoch {e}; "
                                  + (f"{run_dir / CHECKPOINT} holds epoch {epoch}. " if epoch and cfg.checkpoint
                                     else "no epoch was completed. ")
                                  + "Run the same command again to resume.", stop.received)
            sync()
            epoch_time = time.perf_counter() - t0 - (evaluator.seconds - eval_s0)  # step evaluations excluded
            if ctx.distributed:
                # Same gates and data order on every rank, or the run is not the run it claims to be.
                distributed.check_identical("gates or data order",
                                            distributed.fingerprint(torch.tensor([gate_crc]),
                                                                    batches.generator.get_state()), ctx)
                seen = int(distributed.sum_(torch.tensor([seen]), ctx).item())
                distributed.sum_(loss_sum, ctx)
                distributed.sum_(wrong, ctx)
                first_bad_step = distributed.first_step(first_bad_step, ctx)
            bad = int(first_bad_step.item())
            if bad >= 0:
                raise FloatingPointError(
                    f"non-finite training loss at epoch {e}, step {bad} (global step {steps_total + bad}); "
                    + (f"the last good checkpoint is {run_dir / CHECKPOINT} (epoch {epoch})"
                       if epoch and cfg.checkpoint else "no checkpoint was written"))
            steps = len(batches)
            train_time += epoch_time
            active_total += active
            steps_total += steps

            # ---- evaluation (excluded from the training time), best-val bookkeeping
            evaluated = evaluator.run(steps_total, e, epoch_end=True)
            val_err, test_err = evaluated["val_error_pct"], evaluated["test_error_pct"]

            record = {"epoch": e, "step": steps_total, "lr": lr, "train_loss": loss_sum.item() / seen,
                      "train_error_pct": 100.0 * wrong.item() / seen, "val_error_pct": val_err,
                      "test_error_pct": test_err, "epoch_train_time_s": epoch_time,
                      "images_per_s": seen / epoch_time, "active_blocks_mean": active / steps}
            if cfg.dataset.top5:
                record.update({k: evaluated[k] for k in ("val_top5_error_pct", "test_top5_error_pct")})
            record.update(grad_stats.end_epoch(), lr_drop=epoch > 0 and lr < lr_at(epoch - 1, cfg.optim))
            if ctx.is_main:
                board.write_epoch(record, e, grad_stats)
                log_epoch(writer, record, expected_depth)  # flushes the event file
            log.info("epoch %d/%d | lr %.4g | train loss %.4f err %.2f%% | val %s | test %.2f%% | %.1fs %.0f img/s"
                     " | blocks %.2f/%.2f", e, cfg.epochs, lr, record["train_loss"], record["train_error_pct"],
                     "-" if val_err is None else f"{val_err:.2f}%", test_err, epoch_time,
                     record["images_per_s"], record["active_blocks_mean"], expected_depth)

            # metrics.jsonl first, checkpoint second: a kill in between leaves a line that the
            # resumed run drops (it resumes from the previous checkpoint and redoes the epoch).
            if ctx.is_main:
                append_jsonl(metrics_path, record)
            if cfg.checkpoint and ctx.is_main:
                save_checkpoint(run_dir / CHECKPOINT, {
                    "epoch": e, "step": steps_total, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "gates": gates.state_dict(),
                    "data": batches.state_dict(), "rng": rng_state(),
                    "normalizer": normalizer.state_dict(), "best": evaluator.best, "last_record": record,
                    "train_time_s": train_time, "active_total": active_total,
                    "config": to_plain(cfg)})
            if distributed.any_rank(stop.received is not None, ctx):
                stop.received = stop.received or signal.SIGTERM
                raise Interrupted(f"stopped by {signal.Signals(stop.received).name} after epoch {e}; "
                                  f"run the same command again to resume.", stop.received)

    results = {
        "status": "finished",
        "dataset": cfg.dataset.name, "depth": cfg.depth, "num_blocks": num_blocks, "pL": cfg.pL,
        "survival": cfg.survival.value, "seed": cfg.seed, "epochs": cfg.epochs,
        "test_error_at_best_val_pct": evaluator.best["test_error_pct"],
        "best_val_error_pct": evaluator.best["val_error_pct"],
        # fractional when the selected evaluation was a step evaluation (eval_every_steps)
        "best_val_epoch": evaluator.best["epoch"], "best_val_step": evaluator.best["step"],
        "selection": "best_val" if eval_sets["val"] is not None else "last_epoch",
        "final_test_error_pct": record["test_error_pct"],
        "train_time_s": train_time, "train_time_per_epoch_s": train_time / cfg.epochs,
        "wall_time_s": time.perf_counter() - wall_start,
        "expected_active_blocks": expected_depth,
        "measured_active_blocks": active_total / steps_total,
        **({"test_top5_error_at_best_val_pct": evaluator.best["test_top5_error_pct"],
            "final_test_top5_error_pct": record["test_top5_error_pct"]} if cfg.dataset.top5 else {}),
        "device": str(rt.device), "bf16": rt.bf16, "channels_last": rt.channels_last, "speed": speed,
        "world_size": ctx.world_size, "cpu_threads": torch.get_num_threads(),
        "config": to_plain(cfg), "versions": software_versions(),
    }
    if ctx.is_main:
        write_json(run_dir / "results.json", results)
        board.end(results)
        writer.close()
        if evaluator.writer is not None:
            evaluator.writer.close()
    log.info("done: test error %.2f%% at best val epoch %s (final %.2f%%), training time %.1fs",
             results["test_error_at_best_val_pct"], results["best_val_epoch"], record["test_error_pct"], train_time)
    return results


def log_epoch(writer, record: dict, expected_depth: float) -> None:
    """One point per epoch for each scalar; the x-axis is the 1-based epoch."""
    e = record["epoch"]
    scalars = {"loss/train": record["train_loss"], "error/train": record["train_error_pct"],
               "error/val": record["val_error_pct"], "error/test": record["test_error_pct"],
               "error/val_top5": record.get("val_top5_error_pct"),
               "error/test_top5": record.get("test_top5_error_pct"),
               "lr": record["lr"], "time/epoch_train_s": record["epoch_train_time_s"],
               "throughput/train_images_per_s": record["images_per_s"],
               "depth/active_blocks_mean": record["active_blocks_mean"],
               "depth/active_blocks_expected": expected_depth}
    for tag, value in scalars.items():
        if value is not None:
            writer.add_scalar(tag, value, e)
    writer.flush()
