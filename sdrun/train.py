"""The training loop, top to bottom: data, model, optimiser, epochs, evaluation, outputs.

One call of `train(cfg, run_dir)` is one run. It writes into run_dir:
  events.out.tfevents.*  TensorBoard scalars, one point per epoch
  metrics.jsonl          one JSON line per epoch
  checkpoint.pt          the latest epoch's full training state (weights_only-loadable)
  results.json           headline numbers at the end (the paper's protocol), config, versions
"""

from __future__ import annotations

import logging
import math
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from sdrun.cifar_loader import make_train_batches
from sdrun.config import Toggle, to_plain, validate
from sdrun.data import Normalizer, eval_batches, load_image_data
from sdrun.io import append_jsonl, save_checkpoint, write_json
from sdrun.models import build_model
from sdrun.rng import derive_seed, seed_global
from sdrun.speed import compile_branches
from sdrun.stochastic import GateSampler, expected_active_blocks

log = logging.getLogger("sdrun")


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
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            from sdrun.config import ConfigError
            raise ConfigError(f"device={cfg.device} but CUDA is not available here (use device=cpu or auto)")
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


def make_optimizer(model: torch.nn.Module, optim: DictConfig) -> torch.optim.SGD:
    """SGD as in the reference code: Nesterov, dampening 0, weight decay on every parameter.

    Every parameter gets a zero gradient tensor up front and gradients are zeroed in place
    (never set to None), so a dropped block still receives weight decay and momentum on
    the steps it is skipped, as the Lua reference's optimizer did.
    """
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, dampening=0.0,
                           weight_decay=optim.weight_decay, nesterov=optim.nesterov)


@torch.inference_mode()
def evaluate(model, batches, rt: Runtime) -> float:
    """Top-1 error (%) of the test-time network (every branch scaled by p_l)."""
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=rt.device)
    count = 0
    for x, y in batches:
        with autocast(rt):
            wrong += (model(x).argmax(1) != y).sum()
        count += len(y)
    return 100.0 * wrong.item() / max(count, 1)


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


def train(cfg: DictConfig, run_dir: str | Path, progress: bool = False) -> dict:
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rt = resolve_runtime(cfg)
    seed_global(cfg.seed)

    # ---- data: uint8 on the device, normalised and augmented per batch there
    # (or dataset.loader=dataloader: a torch DataLoader with torchvision transforms)
    data = load_image_data(cfg.dataset, cfg.seed)
    normalizer = Normalizer.fit(data.train.images)
    batches = make_train_batches(cfg, data.train, normalizer, rt.device, rt.channels_last)
    normalizer = normalizer.to(rt.device)
    val_split, test_split = (s.to(rt.device) if s is not None else None for s in (data.val, data.test))

    # ---- model, optimiser, gates
    model = build_model(cfg.model.arch, cfg.depth, cfg.dataset.num_classes, cfg.pL,
                        cfg.survival.value, cfg.model.scaling.value, cfg.model.shortcut_pool)
    model = model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    if cfg.compile:
        compile_branches(model)
    optimizer = make_optimizer(model, cfg.optim)
    gates = GateSampler(model.survival_probs, derive_seed(cfg.seed, "gates"))
    num_blocks = len(model.survival_probs)
    expected_depth = expected_active_blocks(model.survival_probs)

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(run_dir))
    metrics_path = run_dir / "metrics.jsonl"
    log.info("run dir %s | %s depth %d (L=%d blocks, %s params) pL=%s %s | device %s bf16=%s channels_last=%s",
             run_dir, cfg.dataset.name, cfg.depth, num_blocks,
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", cfg.pL, cfg.survival.value,
             rt.device, rt.bf16, rt.channels_last)
    log.info("data: %d train / %d val / %d test images; expected active blocks %.2f of %d",
             len(data.train), len(data.val) if data.val else 0, len(data.test), expected_depth, num_blocks)

    best = {"val_error_pct": math.inf, "epoch": None, "test_error_pct": None}
    train_time = 0.0
    active_total, steps_total = 0, 0
    wall_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        lr = lr_at(epoch, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- one training epoch; statistics accumulate on the device (no per-step sync)
        model.train()
        loss_sum = torch.zeros((), device=rt.device)
        wrong = torch.zeros((), dtype=torch.int64, device=rt.device)
        seen, active = 0, 0
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        t0 = time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not progress)
        for x, y in bar:
            step_gates = gates.draw()
            with autocast(rt):
                out = model(x, step_gates)
                loss = F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().float() * len(y)
            wrong += (out.detach().argmax(1) != y).sum()
            seen += len(y)
            active += sum(step_gates)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        steps = len(batches)
        active_total += active
        steps_total += steps
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch + 1}; "
                                     f"the last good checkpoint is {run_dir / 'checkpoint.pt'}")

        # ---- evaluation (excluded from the training time), best-val bookkeeping
        val_err = evaluate(model, eval_batches(val_split, normalizer, cfg.eval_batch_size, rt.channels_last), rt) \
            if val_split is not None else None
        test_err = evaluate(model, eval_batches(test_split, normalizer, cfg.eval_batch_size, rt.channels_last), rt)
        if val_err is None or val_err < best["val_error_pct"]:
            best = {"val_error_pct": val_err, "epoch": epoch + 1, "test_error_pct": test_err}

        record = {"epoch": epoch + 1, "step": steps_total, "lr": lr, "train_loss": train_loss,
                  "train_error_pct": 100.0 * wrong.item() / seen, "val_error_pct": val_err,
                  "test_error_pct": test_err, "epoch_train_time_s": epoch_time,
                  "images_per_s": seen / epoch_time, "active_blocks_mean": active / steps}
        append_jsonl(metrics_path, record)
        e = epoch + 1
        writer.add_scalar("loss/train", record["train_loss"], e)
        writer.add_scalar("error/train", record["train_error_pct"], e)
        if val_err is not None:
            writer.add_scalar("error/val", val_err, e)
        writer.add_scalar("error/test", test_err, e)
        writer.add_scalar("lr", lr, e)
        writer.add_scalar("time/epoch_train_s", epoch_time, e)
        writer.add_scalar("throughput/train_images_per_s", record["images_per_s"], e)
        writer.add_scalar("depth/active_blocks_mean", record["active_blocks_mean"], e)
        writer.add_scalar("depth/active_blocks_expected", expected_depth, e)
        writer.flush()
        log.info("epoch %d/%d | lr %.4g | train loss %.4f err %.2f%% | val %s | test %.2f%% | %.1fs %.0f img/s | "
                 "blocks %.2f/%.2f", e, cfg.epochs, lr, train_loss, record["train_error_pct"],
                 "-" if val_err is None else f"{val_err:.2f}%", test_err, epoch_time,
                 record["images_per_s"], record["active_blocks_mean"], expected_depth)

        if cfg.checkpoint:
            save_checkpoint(run_dir / "checkpoint.pt", {
                "epoch": e, "step": steps_total, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "gates": gates.state_dict(),
                "data": batches.state_dict(), "torch_rng": torch.get_rng_state(),
                "normalizer": normalizer.state_dict(), "best": best,
                "train_time_s": train_time, "active_total": active_total, "steps_total": steps_total,
                "config": to_plain(cfg)})

    results = {
        "status": "finished",
        "dataset": cfg.dataset.name, "depth": cfg.depth, "num_blocks": num_blocks, "pL": cfg.pL,
        "survival": cfg.survival.value, "seed": cfg.seed, "epochs": cfg.epochs,
        "test_error_at_best_val_pct": best["test_error_pct"],
        "best_val_error_pct": best["val_error_pct"], "best_val_epoch": best["epoch"],
        "selection": "best_val" if val_split is not None else "last_epoch",
        "final_test_error_pct": test_err,
        "train_time_s": train_time, "train_time_per_epoch_s": train_time / cfg.epochs,
        "wall_time_s": time.perf_counter() - wall_start,
        "expected_active_blocks": expected_depth,
        "measured_active_blocks": active_total / steps_total,
        "device": str(rt.device), "bf16": rt.bf16, "channels_last": rt.channels_last,
        "config": to_plain(cfg), "versions": software_versions(),
        "command": sys.argv,
    }
    write_json(run_dir / "results.json", results)
    writer.close()
    log.info("done: test error %.2f%% at best val epoch %s (final %.2f%%), training time %.1fs",
             results["test_error_at_best_val_pct"], results["best_val_epoch"], test_err, train_time)
    return results
