"""The state of a run between epochs, and the only code that knows the checkpoint's keys.

`TrainState` holds everything the next training step depends on: weights, optimiser
(momentum buffers), gate and data generators, the global RNGs, the best-validation
bookkeeping and the counters. `save` writes it as `checkpoint.pt` (tensors and plain data
only, so it loads with `torch.load(weights_only=True)`); `restore` puts a loaded checkpoint
back, so a resumed run continues bit-identically on the CPU. `SavedRun` is the read-only
view the other commands need (the run's config, weights and normaliser): `sdrun analyze`,
the run-directory checks.
"""

from __future__ import annotations

import io
import pickle
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdrun.files import atomic_write
from sdrun.rundir import CheckpointError


def save_checkpoint(path: str | Path, state: dict) -> None:
    # Serialise in memory first: torch.save on a failing file reports a disk error as an
    # opaque RuntimeError from its zip writer; writing the bytes ourselves keeps the OSError.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load with weights_only=True: tensors and plain containers only, never pickled code."""
    return torch.load(path, map_location=map_location, weights_only=True)


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    gates: Any      # sdrun.model.stochastic.GateSampler
    batches: Any    # the training batch source (sdrun.data.batches.TrainBatchSource)
    normalizer: Any  # saved so that `sdrun analyze` can normalise the test split as training did
    epoch: int = 0   # epochs completed
    step: int = 0    # training steps completed
    train_time_s: float = 0.0  # training time of the completed epochs (evaluation excluded)
    active_total: int = 0      # blocks run, summed over the completed steps
    best: dict = field(default_factory=dict)  # sdrun.engine.evaluate.Evaluator.best
    last_record: dict | None = None  # the last epoch's metrics.jsonl line

    def save(self, path: Path, config: dict) -> None:
        save_checkpoint(path, {
            "epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "gates": self.gates.state_dict(),
            "data": self.batches.state_dict(), "rng": global_rng_state(),
            "normalizer": self.normalizer.state_dict(), "best": self.best, "last_record": self.last_record,
            "train_time_s": self.train_time_s, "active_total": self.active_total, "config": config})

    def restore(self, saved: "SavedRun") -> None:
        """Continue exactly where the checkpoint's epoch ended."""
        saved = saved.full
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.gates.load_state_dict(saved["gates"])
        self.batches.load_state_dict(saved["data"])
        set_global_rng_state(saved["rng"])
        self.best, self.last_record = saved["best"], saved["last_record"]
        self.epoch, self.step = saved["epoch"], saved["step"]
        self.train_time_s, self.active_total = saved["train_time_s"], saved["active_total"]


# What makes a file an sdrun training checkpoint; `sdrun analyze` also needs the weights.
IDENTITY_KEYS = ("config", "epoch")
WEIGHT_KEYS = ("model", "normalizer")


def read_checkpoint(path: Path, required: tuple[str, ...] = IDENTITY_KEYS) -> dict:
    """A training checkpoint, loaded safely (weights_only), or a one-line CheckpointError."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise CheckpointError(f"{path} is not a readable checkpoint (not a torch.save archive)")
    try:
        state = load_checkpoint(path)
    except pickle.UnpicklingError as e:
        # torch names the offending global ("... unsupported GLOBAL posix.system whose module ...").
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        raise CheckpointError(f"{path} holds pickled objects other than tensors and plain data; "
                              f"refusing to load it with weights_only=True" + (f" ({detail})" if detail else "")) from None
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as e:  # truncated or foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not an sdrun training checkpoint (missing {', '.join(missing)})")
    return state


@dataclass
class SavedRun:
    """What other commands read from a checkpoint: the run's config, weights and normaliser."""
    path: Path
    config: dict
    epoch: int
    model: dict | None       # state_dict
    normalizer: dict | None  # {"mean": tensor, "std": float or tensor}
    full: dict               # everything, for TrainState.restore

    @classmethod
    def load(cls, path: Path, with_weights: bool = False) -> "SavedRun":
        state = read_checkpoint(path, IDENTITY_KEYS + (WEIGHT_KEYS if with_weights else ()))
        return cls(Path(path), state["config"], state["epoch"], state.get("model"), state.get("normalizer"), state)


def global_rng_state() -> dict:
    """Every global RNG a run could touch (python, numpy, torch CPU and CUDA), weights_only-safe."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
