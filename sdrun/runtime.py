"""Where and how a run computes: device, precision, memory layout, and the software versions.

Shared by `sdrun train`, `sdrun bench` and `sdrun analyze`, so none of them imports another.
"""

from __future__ import annotations

import platform
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from sdrun.config import ConfigError, Toggle, device_problem


@dataclass
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else the CPU; other names checked (one-line ConfigError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(name)
    if problem:
        raise ConfigError(problem)
    return torch.device(name)


def resolve_runtime(cfg: DictConfig) -> Runtime:
    """Turn 'auto' settings into concrete ones for the device at hand."""
    device = resolve_device(cfg.device)
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


def autocast(rt: Runtime):
    return torch.autocast("cuda", dtype=torch.bfloat16) if rt.bf16 else nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so wall-clock timings mean something); no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def software_versions() -> dict:
    import hydra
    import omegaconf
    import torchvision

    from sdrun import __version__
    return {"sdrun": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "hydra": hydra.__version__,
            "omegaconf": omegaconf.__version__, "cuda": torch.version.cuda,
            "platform": platform.platform()}
