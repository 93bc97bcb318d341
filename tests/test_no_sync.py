"""The training hot path never makes the host wait for the device, checked on the CPU.

On CUDA a step stalls the CPU (so it can no longer queue work ahead of the GPU) when it reads a
device value on the host (`.item()`, `bool()`, `int()`), runs an op whose output shape depends
on the data (`nonzero`, `masked_select`, `unique`: the shape is read back), or copies host
memory to the device without `non_blocking=True` (torch synchronises the stream; from pageable
memory even a non-blocking copy is staged, so sdrun pins first on CUDA: sdrun.data.batches.to_device).
tests/test_cuda.py checks this on a GPU with torch.cuda.set_sync_debug_mode; a CPU has no
stream to sync, so here the same hot path runs on PyTorch's meta device (tensors with shapes
and no data, a device other than the host) under a TorchDispatchMode that sees every aten op
and rejects each of the three. Host-to-device copies are allowed once per epoch (the epoch's
order and augmentation parameters), never per step: their count must not grow with the steps.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from sdrun.data.batches import Normalizer, TrainBatches
from sdrun.data.readers import Split
from sdrun.engine.evaluate import Evaluator
from sdrun.engine.gradstats import GradStats
from sdrun.model.resnet import build_model
from sdrun.engine.optim import make_optimizer
from sdrun.engine.runtime import resolve_runtime
from sdrun.engine.state import TrainState
from sdrun.model.stochastic import GateSampler
from sdrun.engine.loop import StopSignals, train_epoch
from sdrun.engine.setup import Run
from sdrun.ranks import SINGLE

META = torch.device("meta")
# Ops that read device memory back to the host, or whose output shape depends on the data.
HOST_READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default",
              "aten.nonzero_static.default", "aten.masked_select.default", "aten._unique2.default",
              "aten.unique_consecutive.default", "aten.unique_dim.default"}


class SyncWatch(TorchDispatchMode):
    """Records every host-to-device copy and every op of HOST_READS on a non-host tensor."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []      # host -> device copies, with non_blocking
        self.blocking: list[str] = []    # ... of them without non_blocking=True
        self.reads: list[str] = []       # HOST_READS ops on device tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in HOST_READS and any(t.device.type != "cpu" for t in tensors):
            self.reads.append(name)
        if name.startswith("aten._to_copy") and tensors and tensors[0].device.type == "cpu" \
                and kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
            self.copies.append(name)
            if not kwargs.get("non_blocking", False):
                self.blocking.append(name)
        if name.startswith("aten.copy_") and len(tensors) >= 2 and tensors[0].device.type != "cpu" \
                and tensors[1].device.type == "cpu":
            self.copies.append(name)
            if not (len(args) > 2 and args[2]) and not kwargs.get("non_blocking", False):
                self.blocking.append(name)
        return func(*args, **kwargs)


def meta_batches(steps: int, batch_size: int = 8) -> TrainBatches:
    """A device-resident CIFAR-shaped split and the paper's augmentation (translate 4, flip)."""
    split = Split(torch.zeros(1000, 3, 32, 32, dtype=torch.uint8), torch.zeros(1000, dtype=torch.int64)).to(META)
    normalizer = Normalizer(torch.zeros(3, 32, 32), 1.0).to(META)
    return TrainBatches(split, normalizer, batch_size, translate=4, flip=True, seed=1, max_steps=steps,
                        channels_last=True)


def watched_epoch(steps: int) -> SyncWatch:
    """One real train_epoch (data path, gates, train_step with gradient statistics, the epoch's
    device-side statistics, the stop check) of a ResNet-8 on the meta device."""
    rt = resolve_runtime(OmegaConf.create({"device": "cpu", "precision": "fp32", "eval_precision": "same",
                                           "channels_last": "on", "deterministic": False}))
    rt.device = META
    model = build_model("cifar_resnet", 8, 10, 0.5, "linear").to(META, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, OmegaConf.create({"lr": 0.1, "momentum": 0.9, "nesterov": True,
                                                        "weight_decay": 1e-4}))
    state = TrainState(model, optimizer, GateSampler(model.survival_probs, 1), meta_batches(steps), normalizer=None)
    run = Run(cfg=None, ctx=SINGLE, rt=rt, data=None, model=model, net=model, state=state,
              grad_stats=GradStats(model), speed="eager")
    evaluator = Evaluator(lambda name: (0.0, 0.0), has_val=False, every_steps=None, top5=False,
                          sync=lambda: None)  # no step evaluations: the RunLog is never asked to write
    with StopSignals() as stop, SyncWatch() as watch:
        stats = train_epoch(run, evaluator, None, stop)
    assert stats.steps == steps and stats.loss_sum.device == META
    return watch


def test_an_epoch_never_waits_for_the_device():
    short, long = watched_epoch(3), watched_epoch(8)
    problems = []
    if long.reads:
        problems.append(f"host reads of device values: {sorted(set(long.reads))}")
    if long.blocking:
        problems.append(f"{len(long.blocking)} blocking host-to-device copies in 8 steps")
    if len(long.copies) != len(short.copies):
        problems.append(f"host-to-device copies grow with the steps: {len(short.copies)} in an epoch of 3 steps, "
                        f"{len(long.copies)} in one of 8")
    assert not problems, "; ".join(problems)
