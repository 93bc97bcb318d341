"""Is a difference between two settings real? Pure functions on the seeds' values (lists of floats).

- welch(a, b): mean(a) - mean(b) with Welch's 95 % confidence interval and two-sided p-value
  (scipy.stats.ttest_ind with equal_var=False), and a verdict: "lower" when the interval lies
  below 0, "higher" when above, else "not distinguishable with these seeds". With one value on
  a side there is no interval and no p-value (verdict NO_INTERVAL); with no spread at all
  (every value on both sides equal) neither (verdict NO_SPREAD).
- ratio_interval(a, b): the same interval on log(a) - log(b), exponentiated: an interval for
  the ratio of the geometric means of two sets of positive values (Table 2's time ratio).
- power(n, delta, sd) and seeds_needed(delta, sd): the two-sided two-sample t-test with n per
  side, as R's power.t.test computes it (the noncentral t, the far tail ignored); seeds_needed
  is the smallest n >= 2 reaching the power.

tests/test_stats.py checks them against R's documented output (t.test on datasets::sleep,
power.t.test).
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Sequence

from scipy import stats

CONFIDENCE = 0.95
POWER = 0.8
LOWER, HIGHER, SAME = "lower", "higher", "not distinguishable with these seeds"
NO_INTERVAL = "n = 1: no interval"
NO_SPREAD = "no spread between seeds: no interval"
# seeds_needed looks no further (a difference this far inside the noise is not worth seeds).
MAX_SEEDS = 100_000


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b); low, high, p and df are None when there is no interval (see verdict)."""
    diff: float
    low: float | None
    high: float | None
    p: float | None
    df: float | None
    verdict: str


def verdict(low: float, high: float) -> str:
    return LOWER if high < 0 else HIGHER if low > 0 else SAME


def welch(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    a, b = [float(x) for x in a], [float(x) for x in b]
    if not a or not b:
        raise ValueError("welch needs at least one value on each side")
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, None, None, None, None, NO_INTERVAL)
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return Difference(diff, None, None, None, None, NO_SPREAD)
    with warnings.catch_warnings():
        # scipy's warning when one side's values are all equal: its variance is exactly 0, no loss
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    low, high = float(ci.low), float(ci.high)
    return Difference(diff, low, high, float(result.pvalue), float(result.df), verdict(low, high))


def ratio_interval(a: Sequence[float], b: Sequence[float],
                   confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Welch's interval for geomean(a) / geomean(b), from the logs; None without an interval
    (one value on a side, no spread) or with a value that is not positive."""
    if min([*a, *b], default=0.0) <= 0:
        return None
    d = welch([math.log(x) for x in a], [math.log(x) for x in b], confidence)
    return None if d.low is None else (math.exp(d.low), math.exp(d.high))


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The pooled sample standard deviation of two groups; None with fewer than 2 values on a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    ss = (len(a) - 1) * statistics.variance(a) + (len(b) - 1) * statistics.variance(b)
    return math.sqrt(ss / (len(a) + len(b) - 2))


def power(n: int, delta: float, sd: float, alpha: float = 1 - CONFIDENCE) -> float:
    """Power of the two-sided two-sample t-test with n per side to detect a true difference delta
    when the standard deviation is sd (R's power.t.test: only the tail in delta's direction)."""
    df = 2 * n - 2
    t_crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(t_crit, df, abs(delta) / (sd * math.sqrt(2 / n))))


def seeds_needed(delta: float, sd: float | None, target: float = POWER,
                 alpha: float = 1 - CONFIDENCE) -> int | None:
    """The smallest n >= 2 per side with power(n) >= target; None when sd is unknown or 0
    (no spread to go on), delta is 0, or more than MAX_SEEDS would be needed."""
    if sd is None or not sd > 0 or delta == 0 or not math.isfinite(sd):
        return None
    if power(2, delta, sd, alpha) >= target:
        return 2
    low, high = 2, 4  # power(low) < target; grow high until power(high) >= target, then bisect
    while power(high, delta, sd, alpha) < target:
        if high >= MAX_SEEDS:
            return None
        low, high = high, min(2 * high, MAX_SEEDS)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if power(mid, delta, sd, alpha) >= target else (mid, high)
    return high
