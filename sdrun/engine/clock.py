"""Elapsed time and an estimate of the time left, for the epoch log line, the bar and metrics.jsonl.

An epoch's cost is its whole wall time: the training passes, the step evaluations inside it
(eval_every_steps), the epoch-end evaluation and the checkpoint write. It is measured from one
`tick` to the next, so nothing is left out. The estimate is the mean cost of the recent epochs
(a window, so a slower or faster phase shows up within a few epochs) times the epochs left.
This process's first epoch is left out of the window once there is another one: it carries
one-off costs (cudnn autotuning, torch.compile, allocator warm-up) that later epochs do not.

A resumed run counts only its own epochs for the estimate (the killed attempt may have run
on another machine); its elapsed time continues from the last completed epoch's `elapsed_s`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from sdrun.text import duration

WINDOW = 5  # recent epochs averaged for the estimate


class EpochClock:
    def __init__(self, epochs: int, start_epoch: int = 0, elapsed_before: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter, window: int = WINDOW):
        self.epochs, self.epoch = epochs, start_epoch
        self.elapsed_before = float(elapsed_before or 0.0)
        self.clock = clock
        self.start = self.last = clock()
        self.first: float | None = None  # this process's first epoch (warm-up), kept out once others exist
        self.recent: deque[float] = deque(maxlen=window)
        self.eta_s: float | None = None

    def tick(self, epoch: int) -> dict:
        """Epoch `epoch` (1-based) is complete: its cost, and the new estimate, as metrics.jsonl fields."""
        now = self.clock()
        cost, self.last, self.epoch = now - self.last, now, epoch
        if self.first is None:
            self.first = cost
        else:
            self.recent.append(cost)
        per_epoch = sum(self.recent) / len(self.recent) if self.recent else self.first
        self.eta_s = per_epoch * (self.epochs - epoch)
        return {"elapsed_s": self.elapsed_s, "eta_s": self.eta_s}

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before + (self.last - self.start)

    def describe(self) -> str:
        """'elapsed 1h 02m, ETA 3h 10m' (ETA '?' before the first epoch ends)."""
        return f"elapsed {duration(self.elapsed_s)}, ETA {'?' if self.eta_s is None else duration(self.eta_s)}"

