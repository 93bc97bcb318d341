"""Where and how a run computes: device, precision, memory layout, and what it ran on.

Shared by `sdrun train`, `sdrun bench` and `sdrun analyze`, so none of them imports another.

Precision (`precision=` in the config, `--precision` in `sdrun bench`):

  fp32  strict IEEE float32: TF32 off for cuDNN convolutions and for matmuls. What the
        paper trained in (Torch7 on TITAN X cards, which have no TF32).
  tf32  float32 storage, TF32 tensor-core math (10-bit mantissa) for convolutions and
        matmuls on Ampere and later; PyTorch's own default for cuDNN convolutions.
  bf16  bfloat16 autocast around forward and loss (weights, optimiser state and
        gradients stay float32); the float32 work outside autocast uses TF32.
  auto  tf32 on CUDA, fp32 on the CPU.

Evaluation uses the training precision unless `eval_precision` names another.
The resolved precision (never 'auto') goes into results.json, with the GPU (`device_info`).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from sdrun import __version__
from sdrun.config import ConfigError, Toggle

PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class Runtime:
    device: torch.device
    precision: str       # resolved: fp32 | tf32 | bf16
    eval_precision: str  # resolved: fp32 | tf32 | bf16
    channels_last: bool


def device_problem(device: str) -> str | None:
    """Why `device` cannot be used here, or None."""
    if not (device in ("auto", "cpu", "cuda") or str(device).startswith("cuda:")):
        return f"device={device!r} must be auto, cpu, cuda or cuda:N"
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            return f"device={device} but CUDA is not available here (use device=cpu or auto)"
    return None


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else the CPU; other names checked (one-line ConfigError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(name)
    if problem:
        raise ConfigError(problem)
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so wall-clock timings mean something); no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_precision(value: str, device: torch.device, train_precision: str | None = None) -> str:
    """'auto'/'same' -> a concrete precision for `device`; raises ConfigError where it cannot run."""
    value = str(value)
    if value == "same":
        return train_precision
    on_cuda = device.type == "cuda"
    if value == "auto":
        return "tf32" if on_cuda else "fp32"
    if value == "tf32" and not on_cuda:
        raise ConfigError("precision=tf32 is a CUDA tensor-core mode; use precision=fp32 (or bf16) on the CPU")
    if value == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support "
                          "(use tf32 or fp32)")
    if value not in PRECISIONS:
        raise ConfigError(f"precision={value!r} must be auto, fp32, tf32 or bf16")
    return value


def set_fp32_math(precision: str) -> None:
    """TF32 on (tf32, bf16) or off (fp32) for cuDNN convolutions and CUDA matmuls.

    The legacy flags on purpose: torch >= 2.9 also has per-backend `fp32_precision`
    strings, but setting those makes later reads of the legacy flags (which inductor and
    other libraries still do) raise 'mix of the legacy and new APIs'; the legacy setters
    keep both views consistent.
    """
    tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


def fp32_math() -> dict:
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def resolve_runtime(cfg: DictConfig) -> Runtime:
    """Turn 'auto' settings into concrete ones for the device at hand, and set the
    process-wide math flags (TF32, cudnn.benchmark, determinism) for training."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.get("precision", "auto"), device)
    eval_precision = resolve_precision(cfg.get("eval_precision", "same"), device, precision)
    # channels_last: faster for convolutions on CUDA tensor cores, and measured faster on the
    # CPU too (`sdrun bench --sections layout`: ResNet-110 training step x1.49 with oneDNN on
    # the 2-core AMD EPYC dev machine), so `auto` means on for both.
    channels_last = {Toggle.on: True, Toggle.off: False, Toggle.auto: True}[cfg.channels_last]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        set_fp32_math(precision)
    if cfg.deterministic and device.type == "cuda":
        # cuBLAS is only deterministic with a fixed workspace; read when its handle is made,
        # so this helps a fresh process (sdrun train), not one that already used cuBLAS.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set both ways: a process that trains twice (tests, bench) must not inherit the last run's.
    # Skipped when it is off and stays off (a fresh process): torch's setter imports
    # torch._inductor, seconds of start-up.
    if cfg.deterministic or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(bool(cfg.deterministic), warn_only=True)
    return Runtime(device, precision, eval_precision, channels_last)


@contextmanager
def _eval_math(rt: Runtime):
    """Evaluation in another fp32 math mode than training: switch the flags, then restore."""
    if rt.device.type != "cuda" or (rt.eval_precision == "fp32") == (rt.precision == "fp32"):
        yield
        return
    before = fp32_math()
    set_fp32_math(rt.eval_precision)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before["cudnn_allow_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = before["matmul_allow_tf32"]


@contextmanager
def autocast(rt: Runtime, eval: bool = False):
    """The training (or, with eval=True, evaluation) precision around a forward pass."""
    precision = rt.eval_precision if eval else rt.precision
    cast = torch.autocast(rt.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with (_eval_math(rt) if eval else nullcontext()), cast:
        yield


def software_versions() -> dict:
    # torchvision's __version__ carries the build's CUDA tag, which its package metadata lacks.
    # Imported here, at a run's end: a device check (sdrun.launch.runs) imports this module and
    # should not wait 1.3 s for torchvision.
    import torchvision

    return {"sdrun": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "hydra": importlib.metadata.version("hydra-core"),
            "omegaconf": importlib.metadata.version("omegaconf"), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "platform": platform.platform()}


def _nvidia_driver() -> str | None:
    """The driver's version: from /proc where the kernel module shows it, else nvidia-smi
    (sandboxed machines may have no /proc/driver/nvidia); None if neither answers."""
    try:
        m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]+)", open("/proc/driver/nvidia/version").read())
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(device: torch.device) -> dict:
    """What ran the numbers: GPU name, count, driver, cuDNN and compute capability (CUDA), or
    the CPU model. Runs of different GPUs or precisions are not averaged by `sdrun table`."""
    if device.type != "cuda":
        cpu = None
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                       if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return {"type": "cpu", "name": cpu or platform.processor() or "cpu", "count": os.cpu_count()}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {"type": "cuda", "name": props.name, "count": torch.cuda.device_count(),
            "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
            "driver": _nvidia_driver(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
