"""The config schema: typed dataclasses (registered with Hydra by sdrun.launch.compose), plus range checks.

OmegaConf enforces the types (and the enums' allowed values) while Hydra composes the
config; `validate` checks ranges and cross-field rules before anything is built. The YAML
files under conf/ only set values; every key they may set is declared here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from sdrun.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad setting."""


class Choice(str, Enum):
    """A string enum whose str() is its value (so ${survival} in a path reads 'linear')."""

    def __str__(self) -> str:
        return self.value


class Survival(Choice):
    linear = "linear"
    uniform = "uniform"


class BranchScaling(Choice):
    paper = "paper"        # train: branch x 1 when it runs; test: branch x p_l
    inverted = "inverted"  # train: branch / p_l when it runs; test: branch x 1


class Toggle(Choice):
    """A setting whose 'auto' value depends on the device (see sdrun.engine.runtime.resolve_runtime)."""
    auto = "auto"
    on = "on"
    off = "off"


class Precision(Choice):
    """Training arithmetic (sdrun.engine.runtime): auto = tf32 on CUDA, fp32 on the CPU."""
    auto = "auto"
    fp32 = "fp32"  # strict float32: TF32 off for convolutions and matmuls (the paper's)
    tf32 = "tf32"  # float32 storage, TF32 tensor-core math (CUDA)
    bf16 = "bf16"  # bfloat16 autocast


class EvalPrecision(Choice):
    """Evaluation arithmetic: same = the training precision."""
    same = "same"
    fp32 = "fp32"
    tf32 = "tf32"
    bf16 = "bf16"


# ---- fidelity choices: where the paper's text and the code that produced its Table 1 differ.
# conf/fidelity/{reference,paper}.yaml set them all at once; docs/fidelity.md has the table.

class BnInit(Choice):
    """BatchNorm scale (gamma) at initialisation; beta is 0 either way."""
    uniform = "uniform"  # gamma ~ U(0, 1): Torch7 nn.BatchNormalization:reset(), what the reference code ran
    ones = "ones"        # gamma = 1: fb.resnet.torch and common practice (the paper does not say)
    # each block's first BN gamma ~ N(1, 0.002), the others U(0, 1): the reference's first public
    # commit (2016-04-01), commented out four days later (docs/fidelity.md)
    first_normal = "first_normal"


class ShortcutPool(Choice):
    """Downsampling in the parameter-free transition shortcut (sdrun.model.resnet.PadShortcut)."""
    avg = "avg"              # 2x2 average, stride 2 (the paper's text; the reference code after its 2017 fix)
    subsample = "subsample"  # 1x1 stride-2 pooling = keep every other pixel (the reference code of 2016)


class ConvInit(Choice):
    """He-normal initialisation of the convolutions: std = sqrt(2 / fan)."""
    fan_in = "fan_in"    # fan = k*k*in_channels (nninit.kaiming, the CIFAR reference)
    fan_out = "fan_out"  # fan = k*k*out_channels (fb.resnet.torch)


class FcBias(Choice):
    """Initial bias of the final linear layer."""
    default = "default"  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)): Torch7's and PyTorch's nn.Linear default
    zero = "zero"        # 0 (fb.resnet.torch zeroes it)


class EpochBase(Choice):
    """How an lr milestone m is read (sdrun.engine.schedule.lr_at)."""
    zero = "zero"  # the lr drops after m completed epochs (the paper's text: 250 epochs at 0.1 on CIFAR)
    one = "one"    # epochs are numbered from 1 and the lr drops at the epoch numbered m (the reference's
                   # `epoch >= 0.5 * max`: 249 epochs at 0.1 on CIFAR, 29 on SVHN)


class StdRule(Choice):
    """Which std the inputs are divided by (sdrun.data.batches.Normalizer.fit)."""
    raw = "raw"          # unbiased std of the raw pixels around their global mean (the reference's data:std())
    centred = "centred"  # population std of the pixels after subtracting the mean (sdrun's reading of the text)


class Normalization(Choice):
    """What is subtracted and divided (sdrun.data.batches.Normalizer.fit)."""
    pixel = "pixel"      # the per-pixel mean image and one global std (the paper, the CIFAR/SVHN reference)
    channel = "channel"  # a mean and a std per colour channel (fb.resnet.torch's CIFAR code, for ResNet-1202)


class SelectFrom(Choice):
    """With eval_every_steps: which evaluations compete for the best-validation selection."""
    steps = "steps"                        # the every-N-step evaluations only (the SVHN reference)
    steps_and_epochs = "steps_and_epochs"  # also every epoch end (sdrun before the fidelity switch)


class Loader(Choice):
    """How training batches are made (see sdrun.data.build)."""
    device = "device"          # uint8 split on the training device, batched augmentation there
    dataloader = "dataloader"  # torch DataLoader + torchvision transforms, per image, on the host


class ImageFormat(Choice):
    """How CIFAR is stored under dataset.root (see sdrun.data.readers.load_cifar)."""
    auto = "auto"                # imagefolder when root/train exists and the pickle folder does not
    pickle = "pickle"            # torchvision's official pickle batches
    imagefolder = "imagefolder"  # train/<class>/*.png|jpg and test/<class>/...


class Arch(Choice):
    cifar_resnet = "cifar_resnet"        # 6n+2 layers, for 32x32 inputs (CIFAR, SVHN)
    imagenet_resnet = "imagenet_resnet"  # ResNet-18/34/50/101/152


class Speed(Choice):
    """How each residual branch runs on the device (see sdrun.engine.speed)."""
    auto = "auto"          # eager for now, CPU and CUDA alike: no GPU has measured the others yet
    eager = "eager"        # plain PyTorch
    compile = "compile"    # torch.compile per branch (inductor)
    graphs = "graphs"      # a CUDA graph per branch and input shape, forward and backward (CUDA only)


@dataclass
class DatasetConfig:
    name: str = MISSING           # cifar10 | cifar100 | digits | svhn | imagenet
    root: str = "data"            # where the dataset lives (relative to the working directory)
    format: ImageFormat = ImageFormat.auto  # CIFAR: auto | pickle | imagefolder
    download: bool = False        # use torchvision's downloader (needs the network)
    check_md5: bool = True        # torchvision's checksum check of the official files
    num_classes: int = 10
    image_size: int = 32
    val_size: int = 5000          # held out from the training split with split_seed
    # seed of the train/validation split (and SVHN's per-class draw); null = the run's seed. The
    # reference seeds once (torch.manualSeed(1)), so all its Table 1 runs share one split: split_seed=1
    split_seed: Optional[int] = None
    translate: int = 4            # random translation of up to this many pixels (0 = off)
    flip: bool = True             # random horizontal flip with p = 0.5
    # svhn: validation images per class held out from [train, extra] with the run's seed
    # (the paper's 400 + 200); replaces val_size there
    val_per_class: list[int] = field(default_factory=lambda: [400, 200])
    resize_size: int = 256        # imagenet: evaluation resizes the short side to this, then centre-crops image_size
    top5: bool = False            # also log top-5 errors (imagenet)
    loader: Loader = Loader.device  # device | dataloader (num_workers applies to the latter)
    std_rule: StdRule = StdRule.raw              # raw (reference) | centred (sdrun's reading of the paper)
    normalization: Normalization = Normalization.pixel  # pixel (paper, reference) | channel (fb.resnet.torch)
    # imagenet training only, fb.resnet.torch's augmentation (sdrun.data.imagenet): colour jitter strength for
    # brightness, contrast and saturation (0 = off) and the PCA lighting noise std (0 = off)
    color_jitter: float = 0.4
    lighting: float = 0.1


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
    epoch_base: EpochBase = EpochBase.one  # one (reference: epoch >= m, numbered from 1) | zero (paper text)


@dataclass
class ModelConfig:
    arch: Arch = Arch.cifar_resnet
    shortcut_pool: ShortcutPool = ShortcutPool.subsample  # subsample (reference, 2016) | avg (paper text)
    scaling: BranchScaling = BranchScaling.paper
    bn_init: BnInit = BnInit.uniform      # uniform (reference: Torch7's U(0,1) gamma) | ones (fb.resnet.torch)
    conv_init: ConvInit = ConvInit.fan_in  # fan_in (CIFAR reference) | fan_out (fb.resnet.torch)
    fc_bias: FcBias = FcBias.default       # default (Linear's own init) | zero (fb.resnet.torch)


@dataclass
class LogConfig:
    grad_stats: bool = True       # per-block gradient statistics each epoch (sdrun/engine/gradstats.py)
    grad_histograms_every: int = 0  # also per-block gradient histograms every N epochs (0 = off)


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
    precision: Precision = Precision.auto  # fp32 | tf32 | bf16; auto = tf32 on CUDA, fp32 on the CPU
    eval_precision: EvalPrecision = EvalPrecision.same  # same = as training
    channels_last: Toggle = Toggle.auto  # auto = on (measured faster on CUDA and CPU: sdrun bench)
    deterministic: bool = False   # cudnn.benchmark off and deterministic algorithms on
    speed: Speed = Speed.auto     # auto | eager | compile | graphs: how the branches run (sdrun.engine.speed)
    sync_bn: bool = False         # torchrun runs: SyncBatchNorm (CUDA only) instead of per-process BN statistics
    num_workers: int = 0          # DataLoader workers for datasets read from disk per batch
    eval_batch_size: int = 500
    # also evaluate every N training steps (None = at epoch ends only); the best-validation
    # selection then works at that granularity (the paper: every 200 iterations on SVHN)
    eval_every_steps: Optional[int] = None
    # which evaluations the selection picks from when eval_every_steps is set (sdrun.engine.evaluate)
    select_from: SelectFrom = SelectFrom.steps
    progress: Toggle = Toggle.auto  # tqdm bar; auto = only on a terminal and not in multirun
    checkpoint: bool = True       # write checkpoint.pt at the end of every epoch
    resume: Optional[str] = None  # a run dir or its checkpoint.pt: continue that run in place
    log: LogConfig = field(default_factory=LogConfig)
    # check=true: build everything up to the first step, time a few steps, print the setting and
    # the projected training time, write nothing and exit 0 (also with -m; sdrun/launch/preflight.py)
    check: bool = False


# Depths of the ImageNet ResNets (He et al. 2016, Table 1); see sdrun.model.resnet.IMAGENET_LAYOUTS.
IMAGENET_DEPTHS = (18, 34, 50, 101, 152)


def _is_cifar_depth(depth: int) -> bool:
    return depth >= 8 and (depth - 2) % 6 == 0


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys of a composed config that the schema does not define, each with the nearest known one.

    Hydra opens the schema's struct flag for `+key=value`, so a typo such as `+pl=0.9` would
    otherwise be composed, ignored by every reader and the run would train with the default."""
    import difflib

    known = set(flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True)))
    given = flatten(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))
    out = []
    for key in sorted(k for k in given if k not in known and k.split(".")[0] != "hydra"):
        near = [k for k in known if k.lower() == key.lower()] or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        out.append(f"{key} is not a setting sdrun knows" + (f" (did you mean {near[0]}?)" if near else ""))
    return out


def _optim_problems(o: Any, epochs: int) -> list[str]:
    """The optimiser's and the schedule's ranges. NaN fails every comparison, so each number is
    first checked to be finite (`optim.lr=nan` would otherwise train until the loss is NaN)."""
    problems = []
    for key, low, high, rule in (("lr", 0, math.inf, "> 0"), ("warmup_lr", 0, math.inf, "> 0"),
                                 ("gamma", 0, 1, "in (0, 1]")):
        if not (math.isfinite(o[key]) and low < o[key] <= high):
            problems.append(f"optim.{key}={o[key]} must be a finite number {rule}")
    if not (math.isfinite(o.momentum) and 0 <= o.momentum < 1):
        problems.append(f"optim.momentum={o.momentum} must be in [0, 1)")
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        problems.append(f"optim.weight_decay={o.weight_decay} must be a finite number >= 0")
    if not 0 <= o.warmup_epochs < max(epochs, 1):
        problems.append(f"optim.warmup_epochs={o.warmup_epochs} must be in [0, epochs={epochs}) "
                        "(the warm-up must leave the run epochs at optim.lr)")
    milestones = list(o.milestones)
    if any(m < 0 for m in milestones) or milestones != sorted(milestones):
        problems.append(f"optim.milestones={milestones} must be increasing epochs >= 0")
    else:
        # A milestone past the run's end never drops the lr: on a shortened run (epochs=100 with
        # the recipe's [250, 375]) it would silently train at the first lr throughout. A
        # milestone at the end itself is allowed: it is the 90-epoch ImageNet run's drop at 90,
        # which that run (the first 90 epochs of the paper's 120-epoch one) does not reach.
        late = [m for m in milestones if m > epochs]
        if late:
            problems.append(f"optim.milestones={milestones} reach past the run's end (epochs={epochs}): the lr "
                            f"would never drop at {', '.join(map(str, late))}; set milestones within the epochs, "
                            f"e.g. optim.milestones=[] for a constant lr")
    return problems


def validate(cfg: DictConfig | Any) -> None:
    """Range and consistency checks that types alone cannot express."""
    problems = unknown_keys(cfg) if isinstance(cfg, DictConfig) else []
    if not 0.0 <= cfg.pL <= 1.0:
        problems.append(f"pL={cfg.pL} is outside [0, 1] (it is the last block's survival probability)")
    if cfg.model.scaling == BranchScaling.inverted and cfg.pL == 0.0:
        problems.append("pL=0 with model.scaling=inverted would divide by zero")
    if cfg.model.arch == Arch.cifar_resnet and not _is_cifar_depth(cfg.depth):
        n = max(1, round((cfg.depth - 2) / 6))
        problems.append(f"depth={cfg.depth} is not 6n+2 for the CIFAR/SVHN ResNet "
                        f"(nearest: {6 * n + 2}; the paper uses 110, 152 and 1202)")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if cfg[key] < 1:
            problems.append(f"{key}={cfg[key]} must be at least 1")
    if cfg.model.arch == Arch.imagenet_resnet and cfg.depth not in IMAGENET_DEPTHS:
        problems.append(f"depth={cfg.depth} is not an ImageNet ResNet depth (one of {', '.join(map(str, IMAGENET_DEPTHS))})")
    if cfg.eval_every_steps is not None and cfg.eval_every_steps < 1:
        problems.append(f"eval_every_steps={cfg.eval_every_steps} must be at least 1 (or null)")
    if len(cfg.dataset.val_per_class) != 2 or min(cfg.dataset.val_per_class) < 0:
        problems.append(f"dataset.val_per_class={list(cfg.dataset.val_per_class)} must be two counts >= 0 "
                        "(per class, from SVHN's train and extra files)")
    if cfg.dataset.resize_size < cfg.dataset.image_size:
        problems.append(f"dataset.resize_size={cfg.dataset.resize_size} must be >= dataset.image_size="
                        f"{cfg.dataset.image_size} (evaluation centre-crops the resized image)")
    if cfg.max_steps_per_epoch is not None and cfg.max_steps_per_epoch < 1:
        problems.append(f"max_steps_per_epoch={cfg.max_steps_per_epoch} must be at least 1 (or null)")
    if cfg.log.grad_histograms_every < 0:
        problems.append(f"log.grad_histograms_every={cfg.log.grad_histograms_every} must be >= 0 (0 = off)")
    if cfg.num_workers < 0:
        problems.append(f"num_workers={cfg.num_workers} must be >= 0")
    problems += _optim_problems(cfg.optim, cfg.epochs)
    if cfg.dataset.val_size < 0:
        problems.append(f"dataset.val_size={cfg.dataset.val_size} must be >= 0")
    if cfg.dataset.translate < 0:
        problems.append(f"dataset.translate={cfg.dataset.translate} must be >= 0")
    for key in ("color_jitter", "lighting"):
        if not math.isfinite(cfg.dataset[key]) or cfg.dataset[key] < 0:
            problems.append(f"dataset.{key}={cfg.dataset[key]} must be a finite number >= 0 (0 = off)")
    for key in ("image_size", "resize_size"):
        if cfg.dataset[key] < 1:
            problems.append(f"dataset.{key}={cfg.dataset[key]} must be at least 1 (pixels)")
    if cfg.dataset.num_classes < 2:
        problems.append(f"dataset.num_classes={cfg.dataset.num_classes} must be at least 2")
    # torch.manual_seed and numpy's SeedSequence take non-negative 64-bit seeds
    for key, seed in (("seed", cfg.seed), ("dataset.split_seed", cfg.dataset.split_seed)):
        if seed is not None and not 0 <= seed < 2**63:
            problems.append(f"{key}={seed} must be an integer in [0, 2^63)")
    if cfg.speed == Speed.graphs and cfg.device == "cpu":
        problems.append("speed=graphs needs a CUDA device (it captures CUDA graphs); use speed=eager or compile on the CPU")
    if problems:
        raise ConfigError("; ".join(problems))


# Settings that may differ between the attempts of one run (or between runs that are
# averaged together) without changing its numbers. speed changes only the rounding (as
# device does).
RUNTIME_ONLY = frozenset({"progress", "device", "num_workers", "eval_batch_size", "checkpoint", "resume", "check",
                          "dataset.root", "dataset.download", "dataset.check_md5", "speed"})


def flatten(plain: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a plain config as dotted keys, for comparing configs."""
    out = {}
    for k, v in plain.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain JSON-able data (enums as their names)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
