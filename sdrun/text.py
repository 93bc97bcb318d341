"""Words and numbers as sdrun prints them, spelt once: durations and the name of a run's model.

The epoch log line, `sdrun status`, `check=true`, `sdrun table`, `sdrun plot` and `sdrun report`
all print through these, so one idea reads the same everywhere. Imports nothing.
"""

from __future__ import annotations

# pL = 1: every block runs at every step, the plain ResNet the paper compares against.
CONSTANT_DEPTH = "constant depth"


def model_label(pL: float, survival: str | None) -> str:
    """A run's model as tables, figures and reports name it: 'constant depth' (pL = 1, where
    the survival rule makes no difference) or 'stochastic linear pL=0.5'."""
    if pL == 1.0 or survival is None:
        return CONSTANT_DEPTH
    return f"stochastic {survival} pL={pL:g}"


def duration(seconds: float | None, days: bool = True) -> str:
    """A duration for people, rounded to its last unit: '2d 03h', '20h 42m', '4m 05s', '12s'
    ('-' for None). days=False counts hours past a day, as the paper's Table 2 writes its
    training times ('33h 43m') and as GPU hours are budgeted."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    # Each unit is chosen by the value rounded to the next finer one, so 59.6 s reads '1m 00s'.
    s, minutes = round(seconds), round(seconds / 60)
    if days and minutes >= 24 * 60:
        hours = round(seconds / 3600)
        return f"{hours // 24}d {hours % 24:02d}h"
    if s >= 3600:
        return f"{minutes // 60}h {minutes % 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"
