"""A run directory's layout: the files a run writes, their names and keys, their readers, and
what makes a directory a run's.

The engine writes them (sdrun.engine.log, sdrun.engine.state); the launch layer checks them
(sdrun.launch.runs, sdrun.launch.guard), sdrun.liveness holds the lock and the heartbeat, and
`sdrun status`, `sdrun table`, `sdrun plot` and `sdrun report` read them (sdrun.report). Errors are
in percent, times in seconds. Imports nothing heavy, so readers on a login node stay fast.

`results.json` is written once, atomically, when a run ends; this module is the one place that
defines its keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from sdrun.errors import UserError

METRICS = "metrics.jsonl"        # one line per epoch, appended as each ends
EVALS = "evals.jsonl"            # with eval_every_steps: one line per evaluation
CHECKPOINT = "checkpoint.pt"     # the latest epoch's full training state (sdrun.engine.state)
RESULTS = "results.json"         # the headline numbers, when the run has finished
ERROR = "error.json"             # a run that stopped on an error: {"error": one line, "type", "time"}
                                 # (sdrun.launch.app); removed when the run trains again
LOCK = ".sdrun.lock"             # flocked while a process trains the run; stays afterwards (sdrun.liveness)
HEARTBEAT = ".sdrun.heartbeat"   # who trains it, renewed while it does (sdrun.liveness)
HYDRA_DIR = ".hydra"             # Hydra's snapshot of the run's config and overrides
MULTIRUN = "multirun.yaml"       # in a sweep's directory: Hydra's record of the sweep's jobs
SWEEP_SUMMARY = "sweep_summary.json"  # in a sweep's directory: every job's status (sdrun.launch.guard)
FINISHED = "finished"

# The paper's protocol: the test error at the evaluation with the lowest validation error.
HEADLINE = "test_error_at_best_val_pct"

# Keys every finished run's results.json holds (the tables and figures read these).
RESULTS_KEYS = (
    "status",                       # "finished"
    "dataset", "depth", "num_blocks", "pL", "survival", "seed", "epochs",
    HEADLINE,
    "best_val_error_pct",
    "best_val_epoch", "best_val_step",  # fractional epoch when a step evaluation was selected
    "selection",                    # "best_val", or "last_epoch" without a validation set
    "final_test_error_pct",
    # the lowest test error over the epoch ends, and its epoch: fb.resnet.torch's "best top1",
    # selected on the test set, so NOT a valid selection for CIFAR/SVHN (use HEADLINE there);
    # for ImageNet (selection "last_epoch") it is the number fb.resnet.torch prints. None in a run
    # resumed from a checkpoint older than this key; absent from results.json written before it.
    "best_test_error_pct", "best_test_epoch",
    "train_time_s", "train_time_per_epoch_s", "wall_time_s",
    "expected_active_blocks", "measured_active_blocks",
    "device", "precision", "eval_precision",  # resolved (never "auto"): fp32 | tf32 | bf16
    "fp32_math", "hardware",        # TF32 flags in force (CUDA); GPU name, count, driver, cuDNN (or the CPU)
    "channels_last", "speed",       # speed: the resolved speed= mode (eager | compile | graphs)
    "world_size", "cpu_threads",
    "fidelity",                     # which preset the paper-vs-reference choices match (sdrun.fidelity)
    "config",                       # the full resolved config (plain data)
    "versions",                     # software versions
)
# The fields of a run's files that are measured wall-clock time: the only ones that vary
# between two runs of one config that are otherwise identical (an uninterrupted run and a
# resumed one, a rerun with deterministic=true). Every test that compares runs drops exactly
# these; tests/test_resume.py fails when a timing field is missing here or a listed one no
# longer varies. evals.jsonl has none.
WALL_CLOCK_KEYS = frozenset({
    "epoch_train_time_s", "images_per_s",                   # metrics.jsonl, per epoch (sdrun.engine.loop)
    "elapsed_s", "eta_s",                                   # metrics.jsonl, per epoch (sdrun.engine.clock)
    "train_time_s", "train_time_per_epoch_s", "wall_time_s",  # results.json
})


# A run directory holds one of these files, or Hydra's .hydra/. The lock and the heartbeat
# count too: they mark a run that is training (or was killed) before its first epoch ended
# where Hydra wrote no .hydra/ (hydra.output_subdir=null, a run trained through
# sdrun.launch.app.train directly), and the lock file outlives the process; error.json marks
# one that failed there. evals.jsonl and checkpoint.pt need not be listed: the first is
# written under the lock, the second after metrics.jsonl.
RUN_FILES = frozenset({RESULTS, METRICS, ERROR, LOCK, HEARTBEAT})


def is_run_dir(filenames: Iterable[str], dirnames: Iterable[str]) -> bool:
    """Whether a directory with these files and subdirectories is a run's (one os.walk step)."""
    return bool(RUN_FILES.intersection(filenames)) or HYDRA_DIR in dirnames


def is_sweep_dir(filenames: Iterable[str]) -> bool:
    """Whether a directory with these files is a multirun sweep's (its jobs are below it)."""
    return bool({MULTIRUN, SWEEP_SUMMARY}.intersection(filenames))


def run_dirs(root: Path) -> Iterator[Path]:
    """Every run directory below root (root included), in name order; a run directory holds
    no further runs, and hidden directories (.hydra/, .gpu_slots/) are not searched."""
    for dirpath, dirnames, filenames in os.walk(root):
        if is_run_dir(filenames, dirnames):
            dirnames[:] = []
            yield Path(dirpath)
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, [] when there is none. A line is appended whole
    (sdrun.files.append_jsonl), so only a process killed while appending leaves a line that
    does not parse, the last one: reading stops there and that torn line is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


class CheckpointError(UserError, RuntimeError):
    """A run directory's checkpoint that cannot be used: unreadable, unsafe, not sdrun's, or
    another config's (sdrun.engine.state reads it, sdrun.launch.runs compares it)."""


def read_results(run_dir: Path) -> dict:
    """A run's results.json, or {} where there is no readable one."""
    try:
        results = json.loads((Path(run_dir) / RESULTS).read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return {}
    return results if isinstance(results, dict) else {}
