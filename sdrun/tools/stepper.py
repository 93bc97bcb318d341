"""What `sdrun bench` times: a run built exactly as `sdrun train` builds it, and its training steps.

Shared by sdrun.tools.bench and sdrun.tools.bench_concurrent (whose processes each build one),
so that neither imports the other. The config comes composed and checked (sdrun.tools.bench.config:
the config `sdrun train OVERRIDES` runs).

`Stepper(cfg)` is `sdrun.engine.setup.build_run(cfg)`, the same call `sdrun train` and
`check=true` make: the network the config describes (model_for: shortcut pooling, BatchNorm
and convolution initialisation per fidelity=), its optimiser (cfg.optim, make_optimizer's
implementation), gate sampler, gradient statistics, speed mode, device, precision, memory
layout and data path. `steps(n)` then makes n training steps as sdrun.engine.loop.train_epoch
makes them: the run's next batch (on the device path: gathered, normalised, translated and
flipped on the device), the run's next gates, sdrun.engine.loop.train_step with the run's
gradient statistics. What it leaves out is what train_epoch and fit add around the steps
(the epoch's loss and error sums, stop polling, the progress bar, evaluation, logging,
checkpoints): `sdrun bench --sections overhead` measures that part.

Two departures from a run's epoch, both so that every timed step is one full batch:
- an epoch's smaller last batch is left out (the next epoch starts instead);
- so an epoch is floor(training images / batch) steps: 9 at batch 128 on the embedded
  digits (1,237 training images), against 351 on CIFAR-10. The per-epoch costs (the epoch's
  draw of order and augmentation, the gradient statistics' one read-back, which fit makes at
  each epoch end) come that much more often than in a CIFAR run; on a launch-bound GPU they
  are a few kernels and one synchronisation per epoch.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from sdrun.config import ConfigError
from sdrun.engine.loop import train_step
from sdrun.engine.optim import set_lr
from sdrun.engine.runtime import synchronize
from sdrun.engine.schedule import lr_at
from sdrun.engine.setup import build_run


class Stepper:
    """The run `cfg` describes (sdrun.engine.setup.build_run) and its training steps, timed."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.run = run = build_run(cfg)  # one process: sdrun.ranks.SINGLE
        self.rt = run.rt
        set_lr(run.state.optimizer, lr_at(0, cfg.optim))  # the first epoch's lr, as fit sets it
        self.batch_size = cfg.batch_size
        self.num_blocks = len(run.model.survival_probs)
        batches = run.state.batches
        self.full_steps = len(batches)  # steps of an epoch; only its last batch can be smaller
        if self.full_steps and batches.global_batch_size(self.full_steps) < cfg.batch_size:
            self.full_steps -= 1
        if self.full_steps < 1:
            raise ConfigError(f"batch_size={cfg.batch_size} is more than the {len(run.data.train)} training images "
                              f"of dataset {cfg.dataset.name}: no full batch to time")
        self._epoch = None  # the current epoch's batches (an iterator), and how many were taken
        self._taken = 0

    @property
    def model(self):
        return self.run.model

    @property
    def optimizer(self):
        return self.run.state.optimizer

    def next_batch(self):
        """The run's next full training batch. After an epoch's last full batch the next epoch
        starts (the run's own draw of order and augmentation), and the ended epoch's gradient
        statistics are read, as fit reads them once per epoch."""
        if self._epoch is None or self._taken == self.full_steps:
            if self._epoch is not None:
                self._epoch.close()  # before its smaller last batch is made
                self.run.grad_stats.end_epoch()
            self._epoch, self._taken = iter(self.run.state.batches), 0
        self._taken += 1
        return next(self._epoch)

    def step(self, x, y) -> int:
        """One training step on (x, y) with the run's next gates; the number of blocks that ran."""
        run = self.run
        gates = run.state.gates.draw()
        train_step(run.net, run.state.optimizer, x, y, gates, run.rt, grad_stats=run.grad_stats)
        return sum(gates)

    def steps(self, n: int, batches: list | None = None) -> tuple[float, int]:
        """n training steps on the run's next batches, or cycling through the pre-made `batches`;
        (seconds from an idle device to an idle device, blocks run)."""
        self.run.model.train()
        active = 0
        synchronize(self.rt.device)
        t0 = time.perf_counter()
        for i in range(n):
            active += self.step(*(batches[i % len(batches)] if batches else self.next_batch()))
        synchronize(self.rt.device)
        return time.perf_counter() - t0, active

    def epoch(self, batches: list | None = None) -> tuple[float, int]:
        """One whole epoch of the run, every step train_epoch takes (its smaller last batch
        included), on the run's batches or on the pre-made `batches`; (seconds, images).
        The gradient statistics are read after the timing, as fit reads them after train_epoch."""
        self.run.model.train()
        images = 0
        synchronize(self.rt.device)
        t0 = time.perf_counter()
        for x, y in (self.run.state.batches if batches is None else batches):
            self.step(x, y)
            images += len(y)
        synchronize(self.rt.device)
        seconds = time.perf_counter() - t0
        self.run.grad_stats.end_epoch()
        return seconds, images

    def premade_epoch(self) -> list:
        """The run's next epoch of training batches, made now (from its own data path)."""
        return list(self.run.state.batches)
