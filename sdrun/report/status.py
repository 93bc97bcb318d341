"""`sdrun status DIR...`: where every run and sweep below the directories stands, without torch.

It reads only small files, so it answers in well under a second on a login node:
  results.json         finished runs (the numbers of record)
  metrics.jsonl        per-epoch progress: epoch, errors, elapsed_s, eta_s (sdrun.engine.clock)
  evals.jsonl          step evaluations (eval_every_steps), for the best validation error so far
  .hydra/config.yaml   the run's epochs before it finishes
  .sdrun.lock / .sdrun.heartbeat   whether a process trains it right now (sdrun.liveness)
  error.json           a run that stopped on an error, and its error line (sdrun.launch.app)
  multirun.yaml        a sweep's jobs, including those that have not started yet
  sweep_summary.json   a sweep's failed jobs and their error lines

States: finished, running, interrupted (a run directory nobody trains and that has no
results: killed, preempted, stopped), failed (the sweep summary says so, or the run's
error.json: it stopped on an error, a single run too), not started (a sweep job with no
directory yet). Running and finished win over a stale error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from tabulate import tabulate

from sdrun.errors import ArgParser, UserError
from sdrun.launch.sweeps import expand_sweep
from sdrun.liveness import is_running
from sdrun.rundir import (ERROR, EVALS, FINISHED, HYDRA_DIR, METRICS, MULTIRUN, SWEEP_SUMMARY, is_run_dir,
                          is_sweep_dir, read_jsonl, read_results, run_dirs)
from sdrun.text import duration

STATES = ("finished", "running", "interrupted", "failed", "not started")
RECENT = 5  # epochs averaged for the seconds per epoch of a run that does not log elapsed_s


@dataclass
class RunState:
    path: str | None
    state: str
    job: int | None = None            # a sweep's job number
    overrides: list[str] = field(default_factory=list)
    epoch: int = 0                    # completed epochs
    epochs: int | None = None         # the run's total
    best_val_error_pct: float | None = None
    test_error_at_best_val_pct: float | None = None
    s_per_epoch: float | None = None  # wall seconds per epoch (training, evaluations, checkpoint)
    elapsed_s: float | None = None
    eta_s: float | None = None        # running runs: time left; others: None (finished: 0)
    left_s: float | None = None       # epochs left x s_per_epoch, for runs that are not running
    error: str | None = None          # failed runs: the error line (sweep_summary.json, else error.json)
    why: str | None = None            # how running/not running was decided


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _best(records: list[dict]) -> tuple[float | None, float | None]:
    """Lowest validation error so far (first one on ties, as the trainer selects) and the test error
    there; without a validation split, the last test error (the trainer's last-epoch selection)."""
    with_val = [r for r in records if r.get("val_error_pct") is not None]
    if with_val:
        best = min(with_val, key=lambda r: r["val_error_pct"])
        return best["val_error_pct"], best.get("test_error_pct")
    return None, (records[-1].get("test_error_pct") if records else None)


def _s_per_epoch(records: list[dict]) -> float | None:
    recent = records[-(RECENT + 1):]
    elapsed = [r.get("elapsed_s") for r in recent]
    if len(recent) > 1 and None not in elapsed:
        return (elapsed[-1] - elapsed[0]) / (len(recent) - 1)
    if len(recent) == 1 and elapsed[0] is not None:
        return elapsed[0]
    times = [r["epoch_train_time_s"] for r in records[-RECENT:] if r.get("epoch_train_time_s") is not None]
    return sum(times) / len(times) if times else None


def run_state(path: Path, now: float, summary_job: dict | None = None, job: int | None = None,
              overrides: list[str] | None = None) -> RunState:
    s = RunState(str(path), "interrupted", job, list(overrides or []))
    results = read_results(path)
    records = read_jsonl(path / METRICS)
    config = results.get("config") or _yaml(path / HYDRA_DIR / "config.yaml") or {}
    s.epochs = results.get("epochs") or config.get("epochs")
    if not s.overrides:
        s.overrides = [str(o) for o in (_yaml(path / HYDRA_DIR / "overrides.yaml") or [])]
    if records:
        s.epoch = records[-1].get("epoch", len(records))
        s.elapsed_s = records[-1].get("elapsed_s")
    s.s_per_epoch = _s_per_epoch(records)
    evals = read_jsonl(path / EVALS)
    s.best_val_error_pct, s.test_error_at_best_val_pct = _best(evals or records)
    running, s.why = is_running(path, now)
    if running:
        s.state = "running"
        eta = records[-1].get("eta_s") if records else None
        if eta is not None:  # counted down from when the last epoch was logged
            since = now - (path / METRICS).stat().st_mtime
            s.eta_s = max(0.0, eta - since)
    elif results.get("status") == FINISHED:
        s.state, s.epoch, s.eta_s = "finished", results.get("epochs", s.epoch), 0.0
        s.best_val_error_pct = results.get("best_val_error_pct")
        s.test_error_at_best_val_pct = results.get("test_error_at_best_val_pct")
    elif summary_job is not None and summary_job.get("status") == "failed":
        s.state, s.error = "failed", summary_job.get("error")
    elif isinstance(error := _json(path / ERROR), dict):  # a single run's (a sweep's job has both)
        s.state, s.error = "failed", str(error.get("error") or error.get("type") or "error")
    if s.state in ("interrupted", "failed") and s.epochs and s.s_per_epoch is not None:
        s.left_s = (s.epochs - s.epoch) * s.s_per_epoch
    return s


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The overrides of every job the sweep was launched with (job number = index), from
    multirun.yaml, expanded as Hydra's basic sweeper does; None when it cannot be read."""
    cfg = _yaml(sweep_dir / MULTIRUN)
    try:
        hydra = cfg["hydra"]
        params = hydra["sweeper"].get("params") or {}
        task = list(hydra["overrides"]["task"])
        if hydra["sweeper"].get("_target_", "").rsplit(".", 1)[-1] != "BasicSweeper":
            return None  # another sweeper (optuna, ...) decides its jobs as it goes
    except (TypeError, KeyError, AttributeError):
        return None
    try:
        return expand_sweep(params, task)
    except Exception:  # a sweep syntax this reader does not expand: show the jobs that exist
        return None


def _job_number(path: Path) -> int | None:
    if path.name.isdigit():
        return int(path.name)
    hydra = _yaml(path / HYDRA_DIR / "hydra.yaml") or {}
    try:
        return int(hydra["hydra"]["job"]["num"])
    except (KeyError, TypeError, ValueError):
        return None


def sweep_state(sweep_dir: Path, job_dirs: list[Path], now: float) -> dict:
    summary = _json(sweep_dir / SWEEP_SUMMARY) or {}
    by_num = {j.get("num"): j for j in summary.get("jobs", []) if isinstance(j, dict)}
    expected = expected_jobs(sweep_dir) or []
    dirs = {}
    for d in job_dirs:
        dirs.setdefault(_job_number(d), d)
    nums = sorted(set(range(len(expected))) | {n for n in dirs if n is not None}) + \
        [None] * (None in dirs)
    jobs = []
    for num in nums:
        overrides = expected[num] if num is not None and num < len(expected) else None
        if num in dirs:
            jobs.append(run_state(dirs[num], now, by_num.get(num), num, overrides))
        else:
            s = RunState(None, "not started", num, list(overrides or []))
            s.epochs = _epochs_of(sweep_dir, overrides or [])
            jobs.append(s)
    return {"dir": str(sweep_dir), "jobs": jobs, "total": _total(jobs, now)}


def _epochs_of(sweep_dir: Path, overrides: list[str]) -> int | None:
    for o in overrides:
        if o.startswith("epochs="):
            try:
                return int(o.split("=", 1)[1])
            except ValueError:
                return None
    cfg = _yaml(sweep_dir / MULTIRUN) or {}
    return cfg.get("epochs") if isinstance(cfg.get("epochs"), int) else None


def _total(jobs: list[RunState], now: float) -> dict:
    counts = {state: sum(j.state == state for j in jobs) for state in STATES}
    running = [j for j in jobs if j.state == "running"]
    total = {"jobs": len(jobs), **{k.replace(" ", "_"): v for k, v in counts.items()}, "expected_finish": None}
    if running and all(j.eta_s is not None for j in running):
        # Jobs not started yet run after the running ones, as many at a time as run now; their
        # length is the epochs they need at the mean pace of the jobs with a pace.
        paces = [j.s_per_epoch for j in jobs if j.s_per_epoch]
        pace = sum(paces) / len(paces) if paces else None
        waiting = [j for j in jobs if j.state == "not started"]
        if pace is not None and all(j.epochs for j in waiting):
            queued = sum(j.epochs * pace for j in waiting) / len(running)
            total["expected_finish"] = now + max(j.eta_s for j in running) + queued
    return total


def survey(roots: list[str | Path], now: float | None = None) -> dict:
    """The state of every sweep and single run below the roots, as plain data (what --json prints)."""
    now = time.time() if now is None else now
    sweeps, singles, seen = [], [], set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise StatusError(f"{root} is not a directory")
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            names = set(filenames)
            if here.resolve() in seen:
                dirnames[:] = []
                continue
            if is_sweep_dir(names):
                seen.add(here.resolve())
                job_dirs = [d for name in sorted(dirnames) if not name.startswith(".") for d in run_dirs(here / name)]
                seen.update(d.resolve() for d in job_dirs)
                sweeps.append(sweep_state(here, job_dirs, now))
                dirnames[:] = []
            elif is_run_dir(names, dirnames):
                seen.add(here.resolve())
                singles.append(run_state(here, now))
                dirnames[:] = []  # a run directory holds no further runs
            else:
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return {"time": now, "sweeps": [{**s, "jobs": [asdict(j) for j in s["jobs"]]} for s in sweeps],
            "runs": [asdict(r) for r in singles]}


class StatusError(UserError, ValueError):
    """A missing directory."""


# ---- text

def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _epoch(r: dict) -> str:
    return f"{r['epoch']}/{r['epochs'] if r['epochs'] is not None else '?'}"


def _eta(r: dict) -> str:
    if r["state"] == "running":
        return duration(r["eta_s"]) if r["eta_s"] is not None else "?"
    if r["left_s"]:
        return f"({duration(r['left_s'])} left)"
    return "-"


def _rows(runs: list[dict], first: str, name, common: frozenset = frozenset()) -> tuple[list[str], list[list[str]]]:
    headers = [first, "state", "epoch", "best val %", "test @ best %", "s/epoch", "elapsed", "ETA", "note"]
    body = []
    for r in runs:
        note = " ".join(o for o in r["overrides"] if o not in common)
        if r["error"]:
            note = (note + " | " if note else "") + f"error: {r['error']}"
        body.append([name(r), r["state"], _epoch(r), _pct(r["best_val_error_pct"]),
                     _pct(r["test_error_at_best_val_pct"]),
                     "-" if r["s_per_epoch"] is None else f"{r['s_per_epoch']:.1f}",
                     duration(r["elapsed_s"]), _eta(r), note])
    return headers, body


def render(data: dict) -> str:
    out = []
    now = data["time"]
    for s in data["sweeps"]:
        t = s["total"]
        parts = [f"{t[k.replace(' ', '_')]} {k}" for k in STATES if t[k.replace(" ", "_")]]
        line = f"sweep {s['dir']}: {t['jobs']} jobs: {', '.join(parts) or 'none'}"
        if t["expected_finish"] is not None:
            line += (f"; expected finish {time.strftime('%Y-%m-%d %H:%M', time.localtime(t['expected_finish']))}"
                     f" (in {duration(t['expected_finish'] - now)})")
        elif t["running"] == 0 and (t["interrupted"] or t["not_started"] or t["failed"]):
            line += "; nothing running (run the sweep command again with this hydra.sweep.dir to finish it)"
        # The overrides every job shares once, above the table; each row shows what it sweeps.
        common = frozenset.intersection(*(frozenset(j["overrides"]) for j in s["jobs"])) if s["jobs"] else frozenset()
        if common and len(s["jobs"]) > 1:
            line += "\nevery job: " + " ".join(o for o in s["jobs"][0]["overrides"] if o in common)
        headers, body = _rows(s["jobs"], "job", lambda r: "-" if r["job"] is None else str(r["job"]),
                              common if len(s["jobs"]) > 1 else frozenset())
        out += [line, tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True), ""]
    if data["runs"]:
        headers, body = _rows(data["runs"], "run", lambda r: r["path"])
        counts = {k: sum(r["state"] == k for r in data["runs"]) for k in STATES}
        out += [f"runs: {len(data['runs'])}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v),
                tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True), ""]
    if not out:
        out = ["no runs or sweeps found", ""]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = ArgParser(prog="sdrun status", description=(
        "Where every run and sweep below the directories stands: state (finished, running, "
        "interrupted, failed, not started), epoch, best validation error and the test error there, "
        "seconds per epoch, elapsed time and ETA; a total per sweep."))
    parser.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument("--watch", type=float, metavar="N", help="refresh every N seconds (Ctrl-C stops)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON, for scripts")
    args = parser.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        return parser.fail(f"--watch {args.watch:g}: the interval must be positive (seconds)")
    try:
        while True:
            data = survey(args.dirs)
            text = json.dumps(data, indent=1) if args.json else render(data)
            if args.watch is not None and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")  # clear the terminal between refreshes
            print(text, flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except StatusError as e:
        return parser.fail(str(e), code=e.exit_code)
    except KeyboardInterrupt:
        return 0
