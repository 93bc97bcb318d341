"""A run directory's layout: the files a run writes, their names and keys, and their readers.

The engine writes them (sdrun.engine.log, sdrun.engine.state); the launch layer checks them
(sdrun.launch.runs), and `sdrun status`, `sdrun table`, `sdrun plot` and `sdrun report` read them
(sdrun.report). Errors are in percent, times in seconds. Imports nothing heavy, so readers on
a login node stay fast.

`results.json` is written once, atomically, when a run ends; this module is the one place that
defines its keys.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"        # one line per epoch, appended as each ends
EVALS = "evals.jsonl"            # with eval_every_steps: one line per evaluation
CHECKPOINT = "checkpoint.pt"     # the latest epoch's full training state (sdrun.engine.state)
RESULTS = "results.json"         # the headline numbers, when the run has finished
SWEEP_SUMMARY = "sweep_summary.json"  # in a sweep's directory: every job's status (sdrun.launch.guard)
FINISHED = "finished"

# The paper's protocol: the test error at the evaluation with the lowest validation error.
HEADLINE = "test_error_at_best_val_pct"

# Keys every finished run's results.json holds (the tables and figures read these).
KEYS = (
    "status",                       # "finished"
    "dataset", "depth", "num_blocks", "pL", "survival", "seed", "epochs",
    HEADLINE,
    "best_val_error_pct",
    "best_val_epoch", "best_val_step",  # fractional epoch when a step evaluation was selected
    "selection",                    # "best_val", or "last_epoch" without a validation set
    "final_test_error_pct",
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
# Only with dataset.top5 (ImageNet).
TOP5_KEYS = ("test_top5_error_at_best_val_pct", "final_test_top5_error_pct")

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


def read_results(run_dir: Path) -> dict:
    """A run's results.json, or {} where there is no readable one."""
    try:
        results = json.loads((Path(run_dir) / RESULTS).read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return {}
    return results if isinstance(results, dict) else {}
