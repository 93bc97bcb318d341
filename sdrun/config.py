"""The config schema: typed dataclasses registered with Hydra's ConfigStore, plus range checks.

OmegaConf enforces the types (and the enums' allowed values) while Hydra composes the
config; `validate` checks ranges and cross-field rules before anything is built. The YAML
files under conf/ only set values; every key they may set is declared here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A bad setting; the CLI prints its message on one line and exits non-zero."""


class Survival(str, Enum):
    linear = "linear"
    uniform = "uniform"


class BranchScaling(str, Enum):
    paper = "paper"        # train: branch x 1 when it runs; test: branch x p_l
    inverted = "inverted"  # train: branch / p_l when it runs; test: branch x 1


class Toggle(str, Enum):
    """A setting whose 'auto' value depends on the device (see sdrun.train.resolve_runtime)."""
    auto = "auto"
    on = "on"
    off = "off"


@dataclass
class DatasetConfig:
    name: str = MISSING           # cifar10 | cifar100 | digits (| svhn | imagenet)
    root: str = "data"            # where the dataset lives (relative to the working directory)
    format: str = "auto"          # auto | pickle | imagefolder (CIFAR); see sdrun.data
    download: bool = False        # use torchvision's downloader (needs the network)
    check_md5: bool = True        # torchvision's checksum check of the official files
    num_classes: int = 10
    image_size: int = 32
    val_size: int = 5000          # held out from the training split with the run's seed
    translate: int = 4            # random translation of up to this many pixels (0 = off)
    flip: bool = True             # random horizontal flip with p = 0.5


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    milestones: list[int] = field(default_factory=lambda: [250, 375])
    gamma: float = 0.1
    warmup_epochs: int = 0        # ResNet-1202: lr = warmup_lr for the first warmup_epochs
    warmup_lr: float = 0.01


@dataclass
class ModelConfig:
    arch: str = "cifar_resnet"
    shortcut_pool: str = "avg"    # avg (paper) | subsample (reference code before its 2017 fix)
    scaling: BranchScaling = BranchScaling.paper


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    depth: int = 110
    pL: float = 0.5               # survival probability of the last block; 1.0 = constant depth
    survival: Survival = Survival.linear
    seed: int = 1                 # the reference code seeds with 1
    epochs: int = 500
    batch_size: int = 128
    max_steps_per_epoch: Optional[int] = None  # cap for smoke runs; None = full epochs
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    bf16: Toggle = Toggle.auto    # bf16 autocast; auto = on for CUDA devices that support it
    channels_last: Toggle = Toggle.auto  # auto = on for CUDA (measured faster there)
    deterministic: bool = False   # cudnn.benchmark off and deterministic algorithms on
    sync_bn: bool = False         # torchrun runs: SyncBatchNorm (CUDA only) instead of per-process BN statistics
    num_workers: int = 0          # DataLoader workers for datasets read from disk per batch
    eval_batch_size: int = 500
    progress: Toggle = Toggle.auto  # tqdm bar; auto = only on a terminal and not in multirun
    checkpoint: bool = True       # write checkpoint.pt at the end of every epoch
    resume: Optional[str] = None  # a run dir or its checkpoint.pt: continue that run in place


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _is_cifar_depth(depth: int) -> bool:
    return depth >= 8 and (depth - 2) % 6 == 0


def validate(cfg: DictConfig | Any) -> None:
    """Range and consistency checks that types alone cannot express."""
    problems = []
    if not 0.0 <= cfg.pL <= 1.0:
        problems.append(f"pL={cfg.pL} is outside [0, 1] (it is the last block's survival probability)")
    if cfg.model.scaling == BranchScaling.inverted and cfg.pL == 0.0:
        problems.append("pL=0 with model.scaling=inverted would divide by zero")
    if cfg.model.arch == "cifar_resnet" and not _is_cifar_depth(cfg.depth):
        n = max(1, round((cfg.depth - 2) / 6))
        problems.append(f"depth={cfg.depth} is not 6n+2 for the CIFAR/SVHN ResNet "
                        f"(nearest: {6 * n + 2}; the paper uses 110, 152 and 1202)")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if cfg[key] < 1:
            problems.append(f"{key}={cfg[key]} must be at least 1")
    if cfg.max_steps_per_epoch is not None and cfg.max_steps_per_epoch < 1:
        problems.append(f"max_steps_per_epoch={cfg.max_steps_per_epoch} must be at least 1 (or null)")
    if cfg.num_workers < 0:
        problems.append(f"num_workers={cfg.num_workers} must be >= 0")
    if cfg.optim.lr <= 0:
        problems.append(f"optim.lr={cfg.optim.lr} must be positive")
    if cfg.optim.weight_decay < 0 or not 0 <= cfg.optim.momentum < 1:
        problems.append("optim.weight_decay must be >= 0 and optim.momentum in [0, 1)")
    if any(m < 0 for m in cfg.optim.milestones) or list(cfg.optim.milestones) != sorted(cfg.optim.milestones):
        problems.append(f"optim.milestones={list(cfg.optim.milestones)} must be increasing epochs >= 0")
    if cfg.dataset.val_size < 0:
        problems.append(f"dataset.val_size={cfg.dataset.val_size} must be >= 0")
    if cfg.dataset.translate < 0:
        problems.append(f"dataset.translate={cfg.dataset.translate} must be >= 0")
    if cfg.model.shortcut_pool not in ("avg", "subsample"):
        problems.append(f"model.shortcut_pool={cfg.model.shortcut_pool!r} must be 'avg' or 'subsample'")
    if not (cfg.device in ("auto", "cpu", "cuda") or str(cfg.device).startswith("cuda:")):
        problems.append(f"device={cfg.device!r} must be auto, cpu, cuda or cuda:N")
    elif str(cfg.device).startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            problems.append(f"device={cfg.device} but CUDA is not available here (use device=cpu or auto)")
    if problems:
        raise ConfigError("; ".join(problems))


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain JSON-able data (enums as their names)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
