"""Finding finished runs below directories and grouping them for `sdrun table` and `sdrun plot`.

A run directory is what sdrun.rundir.is_run_dir says (single runs and the job folders of
multirun sweeps look alike). A run counts when its
results.json says status "finished"; every other run directory is reported as skipped, with
the reason, and never breaks a table.

Runs are grouped by dataset, depth, pL and survival rule, and the seeds of a group are
averaged. Runs are only averaged when their recipe (every other setting that changes what
is measured: epochs, batch size, lr schedule, augmentation, device...) is the same; a group
whose runs differ is split into one row per recipe, labelled with the settings that differ,
and a note says so.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sdrun.config import RUNTIME_ONLY, flatten
from sdrun.errors import UserError
from sdrun.rundir import FINISHED, HEADLINE, METRICS, RESULTS, read_jsonl, run_dirs
from sdrun.text import model_label

# results.json keys the tables and figures read; a finished run without them is corrupt.
REQUIRED_KEYS = ("dataset", "depth", "pL", "survival", "seed", "epochs", "num_blocks",
                 HEADLINE, "train_time_s", "train_time_per_epoch_s",
                 "expected_active_blocks", "precision", "eval_precision", "config")
NUMBER_KEYS = ("depth", "pL", "seed", "epochs", "num_blocks", HEADLINE,
               "train_time_s", "train_time_per_epoch_s", "expected_active_blocks")

# Config keys that do not change what a run measures, so runs differing only in them may
# be averaged (the runtime-only settings, a resumed run's `resume` among them). The group
# keys (dataset, depth, pL, survival) and the seed are left out too: they are what rows and
# averages are made of.
# precision/eval_precision: the settings ('auto'); the resolved values are runtime.* below.
NOT_RECIPE = RUNTIME_ONLY | {"seed", "pL", "survival", "depth", "dataset.name", "dataset.format",
                             "precision", "eval_precision"}

Recipe = tuple[tuple[str, Any], ...]


class RunsError(UserError, ValueError):
    """Bad input to `sdrun table`/`sdrun plot` (a missing directory, no finished run)."""


@dataclass(frozen=True)
class FinishedRun:
    path: Path
    results: dict
    recipe: Recipe

    @property
    def dataset(self) -> str:
        return self.results["dataset"]

    @property
    def depth(self) -> int:
        return self.results["depth"]

    @property
    def pL(self) -> float:
        return float(self.results["pL"])

    @property
    def survival(self) -> str | None:
        # With pL = 1 every block always runs: linear and uniform are the same network.
        return None if self.pL == 1.0 else self.results["survival"]

    @property
    def seed(self) -> int:
        return self.results["seed"]

    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / METRICS)


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class Group:
    """The runs (one per seed) of one setting: dataset, depth, pL, survival, recipe."""
    dataset: str
    depth: int
    pL: float
    survival: str | None          # None for constant depth (pL = 1)
    recipe: Recipe
    variant: str                  # the recipe settings that differ from other rows ('' if none)
    runs: list[FinishedRun] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def epochs(self) -> int:
        return self.runs[0].results["epochs"]

    @property
    def cohort(self) -> tuple:
        """Groups in one cohort differ only in pL and survival: they can be compared directly."""
        return self.dataset, self.depth, self.recipe

    def values(self, key: str) -> list[float]:
        return [float(r.results[key]) for r in self.runs]

    def mean(self, key: str) -> float:
        return statistics.fmean(self.values(key))

    def std(self, key: str) -> float | None:
        """Sample standard deviation over seeds (n - 1); None for a single run."""
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else None

    def optional_values(self, key: str) -> list[float] | None:
        """A key not every results.json has (one added after runs were made, like
        best_test_error_pct): its values when every run has a finite number, else None."""
        values = [r.results.get(key) for r in self.runs]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            return None
        return [float(v) for v in values]

    def selection(self) -> str:
        """How the runs picked their reported epoch (results.json "selection": best_val, or
        last_epoch without a validation set); '/'-joined if they differ, '' if none says."""
        return "/".join(sorted({str(r.results["selection"]) for r in self.runs if r.results.get("selection")}))

    def label(self) -> str:
        return model_label(self.pL, self.survival)


def find_runs(roots: Iterable[str | Path]) -> tuple[list[FinishedRun], list[Skipped]]:
    """Every run directory below the roots: finished runs, and the others with a reason."""
    runs, skipped, seen = [], [], set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise RunsError(f"{root} is not a directory")
        for here in run_dirs(root):
            if here.resolve() in seen:
                continue
            seen.add(here.resolve())
            run = read_run(here)
            (runs if isinstance(run, FinishedRun) else skipped).append(run)
    runs, duplicates = _drop_duplicates(runs)
    return runs, sorted(skipped + duplicates, key=lambda s: str(s.path))


def read_run(path: Path) -> FinishedRun | Skipped:
    results_path = path / RESULTS
    if not results_path.is_file():
        epochs = len(read_jsonl(path / METRICS))
        return Skipped(path, f"unfinished: no {RESULTS} ({epochs} epoch(s) in {METRICS})")
    try:
        results = json.loads(results_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return Skipped(path, f"corrupt {RESULTS} ({e})")
    if not isinstance(results, dict):
        return Skipped(path, f"corrupt {RESULTS} (not a JSON object)")
    if results.get("status") != FINISHED:
        return Skipped(path, f"status is {results.get('status')!r}, not 'finished'")
    missing = [k for k in REQUIRED_KEYS if results.get(k) is None]
    if missing:
        return Skipped(path, f"{RESULTS} lacks {', '.join(missing)}")
    bad = [k for k in NUMBER_KEYS
           if isinstance(results[k], bool) or not isinstance(results[k], (int, float)) or not math.isfinite(results[k])]
    if bad or not isinstance(results["config"], dict):
        return Skipped(path, f"{RESULTS} has non-numeric or non-finite {', '.join(bad) or 'config'}")
    return FinishedRun(path, results, recipe_of(results))


def recipe_of(results: dict) -> Recipe:
    """The settings that change what a run measures, as a hashable, sorted tuple."""
    settings = {k: v for k, v in flatten(results["config"]).items() if k not in NOT_RECIPE}
    # Where it ran decides its times, and its precision its numerics: not averaged across
    # either. The resolved precision, not the setting ('auto' means tf32 on CUDA, fp32 on
    # the CPU), and the GPU's name: two GPUs of one kind in different machines do average.
    settings["runtime.device"] = str(results.get("device", "?")).split(":")[0]
    settings["runtime.precision"] = results["precision"]
    settings["runtime.eval_precision"] = results["eval_precision"]
    hardware = results.get("hardware") or {}
    settings["runtime.gpu"] = hardware.get("name") if hardware.get("type") == "cuda" else None
    settings["runtime.channels_last"] = results.get("channels_last")
    return tuple(sorted((k, _hashable(v)) for k, v in settings.items()))


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def _drop_duplicates(runs: list[FinishedRun]) -> tuple[list[FinishedRun], list[Skipped]]:
    """Two runs of the same setting and seed would count one result twice: keep the newest."""
    by_key = defaultdict(list)
    for run in runs:
        by_key[(run.dataset, run.depth, run.pL, run.survival, run.recipe, run.seed)].append(run)
    kept, skipped = [], []
    for same in by_key.values():
        same.sort(key=lambda r: ((r.path / RESULTS).stat().st_mtime, str(r.path)), reverse=True)
        kept.append(same[0])
        skipped += [Skipped(r.path, f"duplicate of {same[0].path} (same settings and seed)") for r in same[1:]]
    return sorted(kept, key=lambda r: str(r.path)), skipped


def differing_keys(recipes: Iterable[Recipe]) -> list[str]:
    """The settings whose values are not the same in all these recipes."""
    dicts = [dict(r) for r in recipes]
    keys = sorted({k for d in dicts for k in d})
    return [k for k in keys if len({repr(d.get(k)) for d in dicts}) > 1]


def variant_labels(recipes: Iterable[Recipe]) -> dict[Recipe, str]:
    """For each recipe, the settings in which it differs from the others: 'epochs=2, batch_size=64'."""
    recipes = list(dict.fromkeys(recipes))
    keys = differing_keys(recipes)
    return {r: ", ".join(f"{k}={_show(dict(r).get(k))}" for k in keys) for r in recipes}


def _show(v: Any) -> str:
    return str(list(v)) if isinstance(v, tuple) else str(v)


def group_runs(runs: list[FinishedRun]) -> tuple[list[Group], list[str]]:
    """Groups sorted by dataset, depth, survival and descending pL, and notes on the settings
    that were split rather than averaged."""
    groups: dict[tuple, Group] = {}
    recipes_by_cell = defaultdict(list)
    for run in runs:
        recipes_by_cell[(run.dataset, run.depth)].append(run.recipe)
    labels = {cell: variant_labels(recipes) for cell, recipes in recipes_by_cell.items()}
    for run in runs:
        key = (run.dataset, run.depth, run.pL, run.survival, run.recipe)
        if key not in groups:
            groups[key] = Group(run.dataset, run.depth, run.pL, run.survival, run.recipe,
                                labels[(run.dataset, run.depth)][run.recipe])
        groups[key].runs.append(run)

    notes = []
    recipes_by_setting = defaultdict(list)
    for g in groups.values():
        recipes_by_setting[(g.dataset, g.depth, g.pL, g.survival)].append(g.recipe)
    for (dataset, depth, pL, survival), recipes in recipes_by_setting.items():
        if len(recipes) > 1:
            differing = differing_keys(recipes)
            notes.append(f"{dataset} depth {depth} pL={pL:g}{'' if survival is None else ' ' + survival}: "
                         f"runs differ in {', '.join(differing)}; shown as separate rows, not averaged")
    ordered = sorted(groups.values(), key=lambda g: (g.dataset, g.depth, g.variant, g.survival or "", -g.pL))
    return ordered, notes


def cohorts(groups: list[Group]) -> dict[tuple, list[Group]]:
    """Groups that differ only in pL and survival, keyed by (dataset, depth, recipe)."""
    out = defaultdict(list)
    for g in groups:
        out[g.cohort].append(g)
    return dict(out)


def load_groups(dirs: list[str]) -> tuple[list[Group], list[str]]:
    """find_runs + group_runs for the report commands, printing skipped runs to stderr.

    Raises RunsError for a missing directory and NoRuns when nothing finished is there."""
    runs, skipped = find_runs(dirs)
    for s in skipped:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    if not runs:
        raise NoRuns(f"no finished runs below {', '.join(dirs)} ({len(skipped)} skipped)")
    return group_runs(runs)


class NoRuns(RunsError):
    """The directories exist but hold no finished run (exit code 1, not a usage error)."""

    exit_code = 1
