"""Hand-written run directories in the trainer's output format, for exact table/plot checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from omegaconf import OmegaConf

from sdrun.config import TrainConfig
from sdrun.rundir import METRICS, RESULTS

DEFAULT_CONFIG = OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True)
DEFAULT_CONFIG["dataset"]["name"] = "cifar10"


def write_run(path: Path, *, dataset="cifar10", depth=110, pL=0.5, survival="linear", seed=1, epochs=500,
              error=5.0, final_error=None, best_error=None, selection="best_val", per_epoch_s=60.0,
              num_blocks=54, expected=None, device="cuda:0", precision=None, gpu="NVIDIA H200",
              config: dict | None = None, metrics: list[dict] | None = None) -> Path:
    """results.json (and metrics.jsonl when given) as `sdrun train` writes them.

    precision: the resolved one (default: what 'auto' gives, tf32 on CUDA, fp32 on the CPU).
    selection="last_epoch": a run without a validation set (ImageNet's default), `error` is then
    the last epoch's; best_error: the lowest test error over the epochs (default error - 0.2)."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    cfg.update(depth=depth, pL=pL, survival=survival, seed=seed, epochs=epochs)
    cfg["dataset"]["name"] = dataset
    for key, value in (config or {}).items():  # dotted keys: {"optim.lr": 0.2}
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    if expected is None:  # linear decay: sum of p_l = L - (1 - pL)(L + 1)/2
        expected = num_blocks - (1 - pL) * ((num_blocks + 1) / 2 if survival == "linear" else num_blocks)
    results = {
        "status": "finished", "dataset": dataset, "depth": depth, "num_blocks": num_blocks, "pL": pL,
        "survival": survival, "seed": seed, "epochs": epochs, "test_error_at_best_val_pct": error,
        "best_val_error_pct": None if selection == "last_epoch" else error + 0.3, "best_val_epoch": epochs,
        "selection": selection,
        "final_test_error_pct": final_error if final_error is not None else error if selection == "last_epoch"
        else error + 1.0,
        "best_test_error_pct": error - 0.2 if best_error is None else best_error, "best_test_epoch": epochs - 1,
        "train_time_s": per_epoch_s * epochs, "train_time_per_epoch_s": per_epoch_s,
        "wall_time_s": per_epoch_s * epochs * 1.1, "expected_active_blocks": expected,
        "measured_active_blocks": expected, "device": device,
        "channels_last": device.startswith("cuda"), "config": cfg, "versions": {}, "command": ["sdrun"],
    }
    on_cuda = device.startswith("cuda")
    precision = precision or ("tf32" if on_cuda else "fp32")
    results.update(precision=precision, eval_precision=precision,
                   hardware={"type": "cuda", "name": gpu, "count": 1, "driver": "580.159.03", "cudnn": 91500}
                   if on_cuda else {"type": "cpu", "name": "AMD EPYC", "count": 2})
    path.mkdir(parents=True, exist_ok=True)
    (path / RESULTS).write_text(json.dumps(results))
    if metrics is not None:
        (path / METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return path


def curve(epochs: int, start: float, step: float, lr_drops=(), grads=None, flag_drops=False) -> list[dict]:
    """metrics.jsonl records: test error start + step*e, train loss a tenth of it, lr /10 at drops."""
    out, lr = [], 0.1
    for e in range(1, epochs + 1):
        dropped = e in lr_drops
        lr = lr / 10 if dropped else lr
        record = {"epoch": e, "step": 10 * e, "lr": lr, "train_loss": (start + step * e) / 10,
                  "train_error_pct": 1.0, "val_error_pct": start + step * e, "test_error_pct": start + step * e,
                  "epoch_train_time_s": 1.0, "images_per_s": 100.0, "active_blocks_mean": 2.0}
        if grads is not None:
            record["grad_mean_abs"] = [grads[e - 1], 0.5, None]
        if flag_drops:
            record["lr_drop"] = dropped
        out.append(record)
    return out
