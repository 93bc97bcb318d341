"""The run directory's contract (sdrun.rundir): one reader of its JSON lines, and one rule for what
a run directory is, which `sdrun status` and `sdrun table` share."""

from pathlib import Path

from sdrun.files import append_jsonl, rewrite_jsonl
from sdrun.report.collect import find_runs
from sdrun.report.status import survey
from sdrun.rundir import LOCK, METRICS, read_jsonl


def killed_while_appending(path: Path, epochs: int) -> None:
    for epoch in range(1, epochs + 1):
        append_jsonl(path, {"epoch": epoch})
    with open(path, "a") as f:
        f.write('{"epoch": %d, "test_err' % (epochs + 1))


def test_a_torn_last_line_is_dropped_and_a_missing_file_holds_nothing(tmp_path):
    path = tmp_path / METRICS
    assert read_jsonl(path) == []
    killed_while_appending(path, 2)
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]


def test_a_resumed_run_drops_a_torn_last_line_with_the_epochs_it_redoes(tmp_path):
    path = tmp_path / METRICS
    killed_while_appending(path, 3)
    rewrite_jsonl(path, lambda r: r["epoch"] <= 2)  # the checkpoint holds epoch 2
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    before = path.stat().st_mtime_ns
    rewrite_jsonl(path, lambda r: True)  # nothing to drop: the file is not rewritten
    assert path.stat().st_mtime_ns == before


def test_a_run_killed_in_its_first_epoch_without_hydra_is_a_run_for_status_and_table(tmp_path):
    # hydra.output_subdir=null, or a run trained through sdrun.launch.app.train: no .hydra/, and
    # before the first epoch ends no metrics.jsonl; the lock file outlives the process.
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / LOCK).touch()
    (tmp_path / "empty" / "folder").mkdir(parents=True)
    runs, skipped = find_runs([tmp_path])
    assert runs == [] and [(s.path.name, s.reason) for s in skipped] == \
        [("killed", "unfinished: no results.json (0 epoch(s) in metrics.jsonl)")]
    state = survey([tmp_path])
    assert state["sweeps"] == [] and [(Path(r["path"]).name, r["state"]) for r in state["runs"]] == \
        [("killed", "interrupted")]
