"""sdrun.report.stats against numbers from an independent source: R's documented output.

- Welch's t-test: R's `?t.test` example `t.test(extra ~ group, data = sleep)` (R datasets::sleep,
  Cushny & Peebles' data as Student used them) prints
      t = -1.8608, df = 17.776, p-value = 0.07939
      95 percent confidence interval: -3.3654832  0.2054832
      mean in group 1 0.75, mean in group 2 2.33
- Power: R's `?power.t.test` examples: `power.t.test(n = 20, delta = 1)` gives power = 0.8689528
  (sd = 1, two-sided, sig.level 0.05) and `power.t.test(power = .90, delta = 1)` gives
  n = 22.02110 per group, so 23 whole seeds.
"""

import math

import pytest

from sdrun.report import stats

SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_welch_matches_r_t_test_on_the_sleep_data():
    d = stats.welch(SLEEP_1, SLEEP_2)
    assert d.diff == pytest.approx(0.75 - 2.33)
    assert d.df == pytest.approx(17.776, abs=5e-4)
    assert d.p == pytest.approx(0.07939, abs=5e-6)
    assert d.low == pytest.approx(-3.3654832, abs=5e-8)
    assert d.high == pytest.approx(0.2054832, abs=5e-8)
    assert d.verdict == stats.SAME == "not distinguishable with these seeds"
    # The other way round: the same interval mirrored.
    r = stats.welch(SLEEP_2, SLEEP_1)
    assert (r.low, r.high, r.p) == pytest.approx((-d.high, -d.low, d.p))


def test_verdicts():
    assert stats.welch([1.0, 1.1, 0.9], [5.0, 5.2, 4.8]).verdict == "lower"
    assert stats.welch([5.0, 5.2, 4.8], [1.0, 1.1, 0.9]).verdict == "higher"
    assert stats.verdict(-0.5, 0.1) == stats.SAME
    assert stats.welch([1.0, 2.0], [1.0, 2.0]).verdict == stats.SAME


def test_one_value_on_a_side_has_no_interval_and_no_p_value():
    for a, b in (([5.0], [6.0, 6.5]), ([5.0, 5.5], [6.0]), ([5.0], [6.0])):
        d = stats.welch(a, b)
        assert d.verdict == stats.NO_INTERVAL == "n = 1: no interval"
        assert (d.low, d.high, d.p, d.df) == (None, None, None, None)
        assert d.diff == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    with pytest.raises(ValueError):
        stats.welch([], [1.0])


def test_no_spread_at_all_has_no_interval():
    d = stats.welch([5.0, 5.0], [6.0, 6.0, 6.0])
    assert d.verdict == stats.NO_SPREAD and d.p is None and d.diff == -1.0
    # Spread on one side only is enough.
    assert stats.welch([5.0, 5.0], [6.0, 6.5, 7.0]).p is not None


def test_ratio_interval_is_welch_on_the_logs():
    a, b = [75.0, 82.0, 79.0], [100.0, 110.0]
    low, high = stats.ratio_interval(a, b)
    d = stats.welch([math.log(x) for x in a], [math.log(x) for x in b])
    assert (low, high) == pytest.approx((math.exp(d.low), math.exp(d.high)))
    geo = math.exp(sum(map(math.log, a)) / 3) / math.exp(sum(map(math.log, b)) / 2)
    assert low < geo < high
    assert math.log(geo) - math.log(low) == pytest.approx(math.log(high) - math.log(geo))
    # Scaling one side scales the interval.
    low2, high2 = stats.ratio_interval([2 * x for x in a], b)
    assert (low2, high2) == pytest.approx((2 * low, 2 * high))
    assert stats.ratio_interval([75.0], b) is None
    assert stats.ratio_interval([0.0, 1.0], b) is None


def test_power_matches_r_power_t_test():
    assert stats.power(20, delta=1, sd=1) == pytest.approx(0.8689528, abs=1e-6)
    assert stats.power(20, delta=-1, sd=1) == stats.power(20, delta=1, sd=1)
    # Only delta / sd matters.
    assert stats.power(20, delta=0.5, sd=0.5) == pytest.approx(0.8689528, abs=1e-6)


def test_seeds_needed_matches_r_power_t_test():
    # power.t.test(power = .90, delta = 1): n = 22.02110 per group.
    assert stats.seeds_needed(1.0, 1.0, target=0.9) == 23
    assert stats.power(22, 1, 1) < 0.9 <= stats.power(23, 1, 1)
    n = stats.seeds_needed(1.0, 1.0)  # 80 %: R gives n = 16.71477
    assert n == 17 and stats.power(16, 1, 1) < 0.8 <= stats.power(17, 1, 1)
    assert stats.seeds_needed(10.0, 0.1) == 2  # a difference far outside the noise
    assert stats.seeds_needed(1.0, None) is None and stats.seeds_needed(1.0, 0.0) is None
    assert stats.seeds_needed(0.0, 1.0) is None
    assert stats.seeds_needed(1e-4, 10.0) is None  # beyond MAX_SEEDS


def test_pooled_std():
    assert stats.pooled_std([1.0, 3.0], [2.0, 2.0, 2.0]) == pytest.approx(math.sqrt(2 / 3))
    assert stats.pooled_std([1.0], [2.0, 3.0]) is None
