"""ResNets whose residual blocks are `StochasticResidual` units.

The model knows nothing about how gates are drawn: `forward(x, gates)` takes one gate per
block (True = run, False = drop, None = test rule) and `forward(x)` is the test-time network.
Block types only provide a residual branch and a shortcut, so every family shares the
same stochastic-depth mechanism (sdrun.model.stochastic).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sdrun.model.stochastic import StochasticResidual, run_blocks, survival_probs


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def basic_branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN (post-activation ResNet; ReLU comes after the add)."""
    return nn.Sequential(
        conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        conv3x3(cout, cout), nn.BatchNorm2d(cout),
    )


class PadShortcut(nn.Module):
    """Parameter-free transition shortcut ("option A"): downsample, then zero-pad new channels.

    pool="avg": 2x2 average with stride 2 (the paper; the reference code since its 2017 fix).
    pool="subsample": 1x1 stride-2 subsampling (the reference code when the paper's numbers
    were produced).
    """

    def __init__(self, cin: int, cout: int, stride: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "subsample"):
            raise ValueError(f"unknown shortcut pool {pool!r}; expected 'avg' or 'subsample'")
        self.extra_channels = cout - cin
        self.stride = stride
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            if self.pool == "avg":
                x = F.avg_pool2d(x, kernel_size=self.stride, stride=self.stride)
            else:
                x = x[:, :, ::self.stride, ::self.stride]
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x


class StochasticResNet(nn.Module):
    """stem -> residual blocks (StochasticResidual, each with its survival probability) -> head.

    Subclasses build `stem`, `blocks` and `fc`; the forward pass, the test-time network and
    the head are shared, so every tool that works on one family works on the other.
    """

    stem: nn.Module
    blocks: nn.ModuleList
    fc: nn.Linear

    @property
    def survival_probs(self) -> list[float]:
        return [b.survival_prob for b in self.blocks]

    def forward(self, x: torch.Tensor, gates: Sequence[bool | None] | None = None) -> torch.Tensor:
        return self.head(run_blocks(self.blocks, self.stem(x), gates))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output -> logits (global average pool, linear classifier)."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class CifarResNet(StochasticResNet):
    """The 6n+2-layer ResNet of He et al. for 32x32 inputs (CIFAR, SVHN), with L = 3n blocks."""

    def __init__(self, depth: int, num_classes: int, p_last: float = 0.5, rule: str = "linear",
                 scaling: str = "paper", shortcut_pool: str = "avg", in_channels: int = 3,
                 bn_init: str = "ones", conv_init: str = "fan_in", fc_bias: str = "default"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.stem = nn.Sequential(conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        probs = survival_probs(3 * n, p_last, rule)
        blocks, cin = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                shortcut = (PadShortcut(cin, width, stride, shortcut_pool)
                            if stride != 1 or cin != width else nn.Identity())
                blocks.append(StochasticResidual(basic_branch(cin, width, stride), shortcut,
                                                 probs[len(blocks)], scaling))
                cin = width
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self, mode=conv_init, bn_init=bn_init, fc_bias=fc_bias)


# ---------------------------------------------------------------- ImageNet ResNets

# depth -> (block type, blocks per stage), He et al. 2016, Table 1 (torchvision's layouts).
IMAGENET_LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                    50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
                    152: ("bottleneck", (3, 8, 36, 3))}


def bottleneck_branch(cin: int, width: int, stride: int) -> nn.Sequential:
    """conv1x1 -> BN -> ReLU -> conv3x3 (stride here, as in fb.resnet.torch and torchvision) -> BN -> ReLU
    -> conv1x1 (x4 channels) -> BN."""
    return nn.Sequential(
        nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        conv3x3(width, width, stride), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width),
    )


def projection_shortcut(cin: int, cout: int, stride: int) -> nn.Sequential:
    """1x1 convolution (with the block's stride) + BN, where the block changes shape (option B)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class ImageNetResNet(StochasticResNet):
    """The ImageNet ResNet of He et al. (18/34 basic, 50/101/152 bottleneck blocks), torchvision's layout.

    Stem conv7x7/2 + BN + ReLU + maxpool3x3/2; four stages of widths 64..512 (x4 out for
    bottlenecks), stride 2 at the first block of stages 2-4; global average pool; linear
    classifier. L counts every block: 50 for ResNet-152. Projection shortcuts can output
    negative values, so a dropped projection block still applies the ReLU after its
    shortcut (the reference's ReLU follows the residual unit whether or not it was dropped).
    Parameter layout and count match torchvision's resnetN (60.19 M for ResNet-152).
    """

    def __init__(self, depth: int, num_classes: int = 1000, p_last: float = 0.5, rule: str = "linear",
                 scaling: str = "paper", in_channels: int = 3, bn_init: str = "ones",
                 conv_init: str = "fan_out", fc_bias: str = "zero"):
        super().__init__()
        if depth not in IMAGENET_LAYOUTS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(IMAGENET_LAYOUTS)}, got {depth}")
        kind, counts = IMAGENET_LAYOUTS[depth]
        expansion = 4 if kind == "bottleneck" else 1
        self.depth = depth
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        probs = survival_probs(sum(counts), p_last, rule)
        blocks, cin = [], 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), counts)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                cout = width * expansion
                branch = (bottleneck_branch(cin, width, stride) if kind == "bottleneck"
                          else basic_branch(cin, width, stride))
                project = stride != 1 or cin != cout
                shortcut = projection_shortcut(cin, cout, stride) if project else nn.Identity()
                blocks.append(StochasticResidual(branch, shortcut, probs[len(blocks)], scaling,
                                                 act_on_drop=project))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(cin, num_classes)
        # fb.resnet.torch (the defaults): N(0, sqrt(2 / (k*k*out_channels))), gamma = 1, fc bias 0
        init_weights(self, mode=conv_init, bn_init=bn_init, fc_bias=fc_bias)


BN_INITS = ("uniform", "ones", "first_normal")
FIRST_BN_MEAN, FIRST_BN_STD = 1.0, 0.002  # bn_init="first_normal": nninit.normal's (mean, stdv)


def init_weights(model: nn.Module, mode: str = "fan_in", bn_init: str = "ones", fc_bias: str = "default") -> None:
    """He normal (ReLU gain) for convolutions; BN beta = 0 and gamma per `bn_init`; Linear weights keep
    PyTorch's default (U(+-1/sqrt(fan_in)), the same law as Torch7's nn.Linear:reset()).

    bn_init="uniform": gamma ~ U(0, 1), what Torch7's nn.BatchNormalization:reset() draws and so what
    the reference's plain cudnn.SpatialBatchNormalization layers started from; "ones": gamma = 1
    (fb.resnet.torch's BNInit); "first_normal": the first BatchNorm of every residual branch gets
    gamma ~ N(1, 0.002) (0.002 the std: nninit.normal's `tensor:normal(mean, stdv)`), every other one
    (the stem's, the branch's later ones, a projection shortcut's) U(0, 1) -- the reference's first
    public ResidualDrop.lua. It means the same in both families (in a bottleneck the BN after the
    1x1 reduction); only the CIFAR code ever ran it. fc_bias="zero": the classifier's bias starts at 0
    (fb.resnet.torch). Draws come from torch's global generator, seeded with the run's seed before the
    model is built, in module order.
    """
    if bn_init not in BN_INITS:
        raise ValueError(f"unknown bn_init {bn_init!r}; expected one of {', '.join(BN_INITS)}")
    first_bns = set()
    if bn_init == "first_normal":
        if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
            raise ValueError("bn_init='first_normal' needs a model with residual blocks (model.blocks)")
        first_bns = {id(next(m for m in block.branch.modules() if isinstance(m, nn.BatchNorm2d)))
                     for block in model.blocks}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=str(mode), nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            if id(m) in first_bns:
                nn.init.normal_(m.weight, FIRST_BN_MEAN, FIRST_BN_STD)
            elif bn_init == "ones":
                nn.init.ones_(m.weight)
            else:
                nn.init.uniform_(m.weight, 0.0, 1.0)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and fc_bias == "zero":
            nn.init.zeros_(m.bias)


def first_conv(block: StochasticResidual) -> nn.Conv2d:
    """The first convolution of a block's residual branch (the paper's Fig. 7 looks at block 1's)."""
    return next(m for m in block.branch.modules() if isinstance(m, nn.Conv2d))


def build_model(arch: str, depth: int, num_classes: int, p_last: float, rule: str,
                scaling: str = "paper", shortcut_pool: str = "avg", **init) -> StochasticResNet:
    """`init`: bn_init, conv_init, fc_bias (sdrun.config.ModelConfig; each model has its own defaults)."""
    init = {k: str(v) for k, v in init.items()}
    if arch == "cifar_resnet":
        return CifarResNet(depth, num_classes, p_last, rule, scaling, str(shortcut_pool), **init)
    if arch == "imagenet_resnet":
        return ImageNetResNet(depth, num_classes, p_last, rule, scaling, **init)
    raise ValueError(f"unknown architecture {arch!r}")


def model_for(cfg) -> StochasticResNet:
    """The model a run's config describes (cfg: the whole train config, resolved or plain)."""
    return build_model(str(cfg.model.arch), cfg.depth, cfg.dataset.num_classes, cfg.pL, str(cfg.survival),
                       str(cfg.model.scaling), str(cfg.model.shortcut_pool),
                       **{k: cfg.model[k] for k in ("bn_init", "conv_init", "fc_bias")})
