"""`speed=`: how the residual branches run. Eager, per-branch torch.compile, or per-branch CUDA graphs.

Why per branch. ResNet-110 on 32x32 images has 16-64-channel layers: one training step at
batch 128 is ~800 small kernels, so on a large GPU the step is bound by launching kernels
from Python, not by arithmetic. Capturing or compiling the *whole* model would fix the gate
pattern (2^L of them) into the graph; doing it per residual branch keeps the gate decision
in eager Python: a dropped branch is simply not called, so it launches (or replays) nothing,
and the branches only ever see a handful of input shapes.

Modes (config `speed`, sdrun.config.Speed):
  eager    plain PyTorch.
  compile  torch.compile of each branch (inductor, default mode, static shapes: one graph per
           batch size, RECOMPILE_LIMIT): fused elementwise kernels, fewer launches; numbers
           within rounding of eager (tests/test_speed.py).
  graphs   CUDA only, one process. On its first training call with a new input signature
           (shape, strides, dtype, autocast), a branch is captured with
           torch.cuda.make_graphed_callables: its forward and its backward each become one CUDA
           graph, replayed on every later call, so a branch costs two graph launches plus an
           input copy instead of ~15 kernel launches per pass. Up to GRAPH_SHAPES_PER_BRANCH
           signatures are captured per branch (the full batch and an epoch's smaller last
           batch); any further one, evaluation (eval mode) and no-grad calls run eagerly.
  auto     eager, on the CPU and on CUDA: no GPU has measured compile or graphs yet, so
           neither is the default until one does (docs/speed.md).

BatchNorm under graphs (why the running statistics update exactly as in eager mode):
- The running-statistics update is part of the captured forward: BatchNorm's training
  kernel writes running_mean/running_var in place with the factor momentum (0.1, a constant
  baked into the captured kernel's arguments, exactly the value eager passes), and
  `num_batches_tracked.add_(1)` is a captured in-place add on the buffer. Each replay of the
  forward graph performs exactly that update once, on the same buffer addresses, with the
  same kernels eager would launch, i.e. one update per executed branch call, as in eager mode.
- A dropped branch is not called, so its graph is not replayed: no update, as in eager mode.
- BatchNorm with momentum=None (a cumulative average whose factor 1/num_batches_tracked is
  computed on the host) would bake the capture-time factor into the graph: refused at capture.
- make_graphed_callables runs the branch 3 times eagerly to warm up (cuDNN autotuning, lazy
  init) before capturing, which updates the running statistics 3 times on the sample input.
  `BranchGraphs.capture` saves every buffer before and copies it back after (in place, so
  the graph's addresses stay valid), so the first real replay starts from the eager state.
- load_state_dict copies into the same buffer and parameter tensors, so resuming from a
  checkpoint keeps the graphs valid.
Gradients: a replayed backward returns its parameter gradients from static graph memory;
autograd adds them into each parameter's existing .grad (make_optimizer allocates every
.grad up front and training zeroes in place), so no .grad ever aliases graph memory. A
branch whose parameter has no .grad at capture time is refused.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from sdrun.config import ConfigError, Speed
from sdrun.model.stochastic import StochasticResidual

log = logging.getLogger("sdrun")

# All branches share nn.Module's call code, so dynamo counts the graphs of every branch
# against one recompile limit (8 by default; past it a new input shape runs eagerly, with
# one warning). Branches of the same structure and input shape share a graph, so a model
# needs (branch kinds) x (input shapes) graphs, whatever its depth: branches compile with
# static shapes (dynamic=False, below), one graph per batch size and mode. A CIFAR/SVHN
# ResNet has 5 kinds (the plain block of each of the 3 stages, 2 transitions); ImageNet's
# bottleneck ResNets 8 (each of the 4 stages' first and plain block). Input shapes: training
# (grad, train mode) at the full batch and an epoch's smaller last batch (under torchrun:
# this process's slice of each), evaluation (inference, eval mode) at eval_batch_size and
# the smaller last batch of each of val and test: at most 2 + 3 = 5. So 25 graphs for CIFAR,
# at most 40 for ImageNet; 64 leaves room for one more batch size per kind.
# (tests/test_speed.py counts the graphs of a CIFAR ResNet on the CPU.)
RECOMPILE_LIMIT = 64

# The full batch and an epoch's smaller last batch; each capture holds its own memory pool.
GRAPH_SHAPES_PER_BRANCH = 2


def resolve_speed(setting, device: torch.device, world_size: int = 1) -> str:
    """The mode a run uses: eager | compile | graphs. Raises ConfigError where it cannot run."""
    mode = Speed(str(setting))
    if mode == Speed.auto:
        return Speed.eager.value  # until a GPU run measures compile and graphs (issue 13)
    if mode == Speed.graphs:
        if device.type != "cuda":
            raise ConfigError(f"speed=graphs needs a CUDA device (it captures CUDA graphs); this run is on "
                              f"{device}: use speed=eager or compile")
        if world_size > 1:
            raise ConfigError("speed=graphs runs in one process for now (not measured under torchrun/DDP); "
                              "use speed=eager or compile with torchrun")
    return mode.value


def apply_speed(model: nn.Module, setting, device: torch.device, world_size: int = 1) -> str:
    """Set up `model` (already on `device`) for the chosen mode; return the resolved mode."""
    mode = resolve_speed(setting, device, world_size)
    if mode == "compile":
        compile_branches(model)
    elif mode == "graphs":
        graph_branches(model)
    return mode


def compile_branches(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile, in place, the residual branch of every StochasticResidual of `model`.

    `nn.Module.compile` leaves the parameter names unchanged, so state dicts and
    checkpoints are the same with and without compilation. Returns the number of branches.

    Static shapes (dynamic=False): by default dynamo would mark a dimension symbolic as soon
    as one compiled frame sees it change (automatic dynamic shapes), and all branches share
    one frame, so from the third branch kind on every graph would have a symbolic height and
    width (and batch, once a smaller last batch came): slower compiles and kernels that are
    less specialised. The handful of shapes a run has (RECOMPILE_LIMIT) each get
    their own graph instead.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = [m for m in model.modules() if isinstance(m, StochasticResidual)]
    for block in blocks:
        block.branch.compile(backend=backend, mode=mode, dynamic=False)
    return len(blocks)


def graph_branches(model: nn.Module, max_shapes: int = GRAPH_SHAPES_PER_BRANCH) -> int:
    """Make every residual branch of `model` capture and replay CUDA graphs in training
    (module docstring). Parameter and buffer names are unchanged. Returns the number of branches."""
    blocks = [m for m in model.modules() if isinstance(m, StochasticResidual)]
    for block in blocks:
        for bn in block.branch.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training and bn.momentum is None:
                raise ConfigError("speed=graphs cannot capture BatchNorm with momentum=None "
                                  "(its update factor is computed on the host each step)")
        block.branch.forward = BranchGraphs(block.branch, max_shapes)
    return len(blocks)


def _autocast_state() -> tuple:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


class BranchGraphs:
    """Installed as a branch module's `forward`: replay the graph captured for this input's
    signature in training, capture one on a new signature, run eagerly otherwise."""

    def __init__(self, branch: nn.Module, max_shapes: int):
        self.branch = branch
        self.max_shapes = max_shapes
        self.graphed: dict[tuple, object] = {}

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.branch).forward(self.branch, x)  # the class's forward, not this one

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.branch.training and torch.is_grad_enabled() and x.is_cuda):
            return self.eager(x)
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad, _autocast_state())
        fn = self.graphed.get(key)
        if fn is None:
            if len(self.graphed) >= self.max_shapes:
                return self.eager(x)
            fn = self.graphed[key] = self.capture(x)
        return fn(x)

    def capture(self, x: torch.Tensor):
        branch = self.branch
        missing = [n for n, p in branch.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            raise RuntimeError(f"speed=graphs: parameter(s) {', '.join(missing)} have no .grad tensor; allocate "
                               "every .grad before the first step (sdrun.engine.optim.make_optimizer does)")
        saved = [b.detach().clone() for b in branch.buffers()]
        sample = x.detach().clone().requires_grad_(x.requires_grad)  # clone keeps the strides
        # Another thread's CUDA call (a DataLoader's pin-memory thread) must not void the
        # capture: capture in thread-local mode where this torch offers it.
        extra = ({"capture_error_mode": "thread_local"}
                 if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters else {})
        enabled, dtype = _autocast_state()
        del branch.forward  # make_graphed_callables calls the module: let it run the class's forward
        try:
            # Autocast's weight-cast cache cannot be captured; without it the casts happen
            # inside the graph, reading the current weights on every replay.
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                torch.cuda.make_graphed_callables(branch, (sample,), **extra)
            graphed = branch.forward  # replays while branch.training is True (it is, here)
        finally:
            branch.forward = self
        with torch.no_grad():  # undo the warm-up's 3 running-statistics updates
            for buf, value in zip(branch.buffers(), saved):
                buf.copy_(value)
        log.debug("captured a CUDA graph for %s input %s", type(branch).__name__, tuple(x.shape))
        return graphed
