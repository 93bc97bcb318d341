"""Is a run being trained right now? A lock and a heartbeat in its directory (no torch here).

While `sdrun train` trains a run it holds:
- an exclusive flock on `.sdrun.lock` in the run directory. The kernel releases it when the
  process ends in any way, SIGKILL and OOM kill included, so on the machine that trains the
  run (and on file systems whose locks reach across nodes, e.g. NFSv4, Lustre mounted with
  `flock`) "locked" means "running" and "not locked" means "not running". This is the
  authoritative signal wherever it is visible.
- `.sdrun.heartbeat`: who trains it (host, pid) and a modification time a background thread
  renews every HEARTBEAT_S seconds. For a run trained on another host, where the lock may not
  be visible, a heartbeat younger than STALE_S says running; an older one says the process is
  gone (a SIGKILLed run stops renewing it). On the same host the pid is checked instead.
The heartbeat file is removed when training ends normally or with an error; the lock file stays
(removing it would race with a process that is about to lock it).

A second `sdrun train` on a directory another process is training is refused (one line).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from sdrun.errors import UserError
from sdrun.rundir import HEARTBEAT, LOCK

HEARTBEAT_S = 30.0
STALE_S = 120.0  # 4 missed renewals: the process is gone (or the clocks disagree by minutes)


class Busy(UserError, RuntimeError):
    """Another process is training this run directory: the setting is fine, the directory is taken."""


class Lease:
    """Held by the process that trains a run: the lock, and the heartbeat thread.

    `with Lease(run_dir) as lease:` does nothing on disk until `lease.acquire()`, so a run whose
    directory check fails (finished, foreign) is never touched."""

    def __init__(self, run_dir: str | Path, interval_s: float = HEARTBEAT_S):
        self.dir, self.interval = Path(run_dir), interval_s
        self._file = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        f = open(self.dir / LOCK, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            refuse_if_busy(self.dir)
            raise  # the lock was released in between: report the original error
        self._file = f
        beat = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                "interval_s": self.interval}
        (self.dir / HEARTBEAT).write_text(json.dumps(beat) + "\n")
        self._thread = threading.Thread(target=self._renew, name="sdrun-heartbeat", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.utime(self.dir / HEARTBEAT)
            except OSError:  # a full or vanished file system must not stop training
                pass

    def release(self) -> None:
        if self._file is None:
            return
        self._stop.set()
        self._thread.join()
        try:
            (self.dir / HEARTBEAT).unlink()
        except OSError:
            pass
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def refuse_if_busy(run_dir: Path) -> None:
    """Raise Busy when another process trains run_dir (checked before Hydra writes into it)."""
    if lock_held(run_dir):
        who = read_heartbeat(run_dir) or {}
        raise Busy(f"another process is training {run_dir} right now"
                   + (f" (pid {who.get('pid')} on {who.get('host')})" if who else "")
                   + "; wait for it or stop it first")


def read_heartbeat(run_dir: Path) -> dict | None:
    try:
        beat = json.loads((Path(run_dir) / HEARTBEAT).read_text())
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) else None


def lock_held(run_dir: Path) -> bool:
    """True when some process holds the run's lock (as far as this machine can see)."""
    path = Path(run_dir) / LOCK
    try:
        f = open(path, "r")
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def is_running(run_dir: Path, now: float | None = None) -> tuple[bool, str]:
    """(running?, how we know): the lock first, then the heartbeat."""
    run_dir = Path(run_dir)
    if lock_held(run_dir):
        return True, "lock held"
    beat = read_heartbeat(run_dir)
    if beat is None:
        return False, "no lock, no heartbeat"
    if beat.get("host") == socket.gethostname():
        # Same host: the lock is visible here, so a free lock means the process is gone.
        return False, f"lock free, heartbeat of pid {beat.get('pid')} left behind"
    try:
        age = (time.time() if now is None else now) - (Path(run_dir) / HEARTBEAT).stat().st_mtime
    except OSError:
        return False, "heartbeat vanished"
    if age < STALE_S:
        return True, f"heartbeat from {beat.get('host')} {age:.0f}s ago"
    return False, f"heartbeat from {beat.get('host')} stale ({age:.0f}s old)"
