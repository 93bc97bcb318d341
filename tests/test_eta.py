"""The epoch clock (elapsed time and ETA) and the run lease (lock + heartbeat), in-process."""

from __future__ import annotations

import json
import os
import time

import pytest

from sdrun.config import ConfigError
from sdrun.engine.clock import EpochClock
from sdrun.errors import UserError
from sdrun.liveness import HEARTBEAT, STALE_S, Busy, Lease, is_running, lock_held
from sdrun.rundir import LOCK
from sdrun.text import duration


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def run_epochs(clock: EpochClock, fake: FakeClock, costs: list[float], first_epoch: int = 1) -> list[dict]:
    out = []
    for i, cost in enumerate(costs):
        fake.t += cost
        out.append(clock.tick(first_epoch + i))
    return out


def test_eta_within_20_percent_after_three_epochs_of_a_fixed_cost():
    # 100 epochs of 10 s, the first with 4 s of warm-up; the truth after epoch 3 is 970 s.
    fake = FakeClock()
    clock = EpochClock(100, clock=fake)
    records = run_epochs(clock, fake, [14.0, 10.0, 10.0])
    truth = 97 * 10.0
    assert abs(records[-1]["eta_s"] - truth) / truth < 0.2
    assert records[-1]["eta_s"] == pytest.approx(truth)  # warm-up epoch left out of the window
    assert records[-1]["elapsed_s"] == pytest.approx(34.0)


def test_eta_follows_a_change_of_pace_within_the_window_and_is_zero_at_the_end():
    fake = FakeClock()
    clock = EpochClock(20, clock=fake)
    run_epochs(clock, fake, [10.0] * 6)
    records = run_epochs(clock, fake, [20.0] * 5, first_epoch=7)  # e.g. step evaluations begin
    assert records[-1]["eta_s"] == pytest.approx(9 * 20.0)
    records = run_epochs(clock, fake, [20.0] * 9, first_epoch=12)
    assert records[-1]["eta_s"] == 0.0


def test_a_resumed_run_counts_only_its_own_epochs_and_continues_the_elapsed_time():
    fake = FakeClock()
    clock = EpochClock(10, start_epoch=4, elapsed_before=400.0, clock=fake)  # the killed attempt: 100 s/epoch
    records = run_epochs(clock, fake, [5.0, 5.0], first_epoch=5)
    assert records[-1]["eta_s"] == pytest.approx(4 * 5.0)
    assert records[-1]["elapsed_s"] == pytest.approx(410.0)
    assert clock.describe() == "elapsed 6m 50s, ETA 20s"


def test_duration_rounds_to_its_last_unit_and_counts_days_unless_told_not_to():
    assert [duration(s) for s in (None, 0.4, 59, 59.6, 61, 3599.6, 3600, 86000, 3 * 86400 + 7200)] == \
        ["-", "0s", "59s", "1m 00s", "1m 01s", "1h 00m", "1h 00m", "23h 53m", "3d 02h"]
    # Table 2 as the paper writes it: hours past a day, minutes rounded.
    assert duration(60 * (33 * 60 + 43), days=False) == "33h 43m"
    assert duration((15 * 60 + 7) * 60 + 29, days=False) == "15h 07m"


def test_lease_holds_the_lock_and_a_heartbeat_and_refuses_a_second_trainer(tmp_path):
    assert is_running(tmp_path) == (False, "no lock, no heartbeat")
    with Lease(tmp_path, interval_s=0.05) as lease:
        assert not (tmp_path / LOCK).exists()  # nothing on disk before acquire()
        lease.acquire()
        assert lock_held(tmp_path) and is_running(tmp_path)[0]
        beat = json.loads((tmp_path / HEARTBEAT).read_text())
        assert beat["pid"] == os.getpid()
        before = (tmp_path / HEARTBEAT).stat().st_mtime_ns
        time.sleep(0.3)
        assert (tmp_path / HEARTBEAT).stat().st_mtime_ns > before  # renewed by the thread
        with pytest.raises(Busy, match=f"another process is training {tmp_path} right now .pid {os.getpid()}") as e:
            Lease(tmp_path).acquire()
        assert isinstance(e.value, UserError) and not isinstance(e.value, ConfigError)  # the setting is fine
    assert not lock_held(tmp_path) and not (tmp_path / HEARTBEAT).exists()
    assert is_running(tmp_path)[0] is False


def test_heartbeat_of_another_host_counts_while_fresh(tmp_path):
    (tmp_path / HEARTBEAT).write_text(json.dumps({"host": "node-elsewhere", "pid": 1}))
    assert is_running(tmp_path)[0] is True
    old = time.time() - STALE_S - 5
    os.utime(tmp_path / HEARTBEAT, (old, old))
    running, why = is_running(tmp_path)
    assert not running and "stale" in why
    # The same host with a free lock: the process is gone, however fresh its heartbeat.
    import socket
    (tmp_path / HEARTBEAT).write_text(json.dumps({"host": socket.gethostname(), "pid": 1}))
    assert is_running(tmp_path)[0] is False
