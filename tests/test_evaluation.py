"""sdrun.engine.evaluate.Evaluator: which evaluation is selected, and when the test set is evaluated.

The error function is scripted (a list of validation and test errors per call), so each case
says exactly which numbers the protocol must pick; the real trainer drives the same class in
test_svhn.py's step-evaluation run.
"""

import math

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util
from sdrun.engine.evaluate import Evaluator
from sdrun.engine.tblog import RunBoard
from tests.conftest import compose_cfg


class Scripted:
    """error_of(split) answering from fixed lists, and remembering what was asked."""

    def __init__(self, val: list[float], test: list[float]):
        self.answers = {"val": list(val), "test": list(test)}
        self.calls: list[str] = []

    def __call__(self, split: str) -> tuple[float, float]:
        self.calls.append(split)
        top1 = self.answers[split].pop(0)
        return top1, top1 + 10  # top-5 error: a number that is easy to tell apart


def evaluator(error_of, tmp_path, has_val=True, every_steps=None, top5=False):
    syncs = []
    ev = Evaluator(error_of, has_val, every_steps, top5, lambda: syncs.append(1))
    return ev, syncs


def test_selection_is_the_first_lowest_validation_error(tmp_path):
    # epoch ends: val 50, 40, 40 (a tie: the earlier one stays), 45, 30
    errors = Scripted(val=[50, 40, 40, 45, 30], test=[9, 8, 7, 6, 5])
    ev, syncs = evaluator(errors, tmp_path)
    picks = []
    for e in range(1, 6):
        record = ev.run(step=10 * e, epoch=e, epoch_end=True)
        picks.append((ev.best["epoch"], ev.best["step"], ev.best["val_error_pct"], ev.best["test_error_pct"]))
        assert record["best_val_error_pct"] == ev.best["val_error_pct"]
    assert picks == [(1, 10, 50, 9), (2, 20, 40, 8), (2, 20, 40, 8), (2, 20, 40, 8), (5, 50, 30, 5)]
    assert errors.calls == ["val", "test"] * 5  # epoch ends always measure the test set
    assert len(syncs) == 5 and ev.seconds >= 0


def test_inside_an_epoch_the_test_set_is_evaluated_only_on_a_new_best(tmp_path):
    errors = Scripted(val=[50, 55, 40, 40, 60], test=[9, 7, 6])
    ev, _ = evaluator(errors, tmp_path, every_steps=2)
    records = [ev.run(2, 0.4, epoch_end=False),   # first: a new best -> test
               ev.run(4, 0.8, epoch_end=False),   # worse -> no test
               ev.run(5, 1, epoch_end=True),      # epoch end -> test (and a new best)
               ev.run(6, 1.2, epoch_end=False),   # tie -> not a new best, no test
               ev.run(8, 1.6, epoch_end=False)]   # worse -> no test
    assert [r["test_error_pct"] for r in records] == [9, None, 7, None, None]
    assert errors.calls == ["val", "test", "val", "val", "test", "val", "val"]
    assert (ev.best["step"], ev.best["epoch"], ev.best["test_error_pct"]) == (5, 1, 7)
    assert records == [
        {"step": 2, "epoch": 0.4, "val_error_pct": 50, "test_error_pct": 9, "best_val_error_pct": 50},
        {"step": 4, "epoch": 0.8, "val_error_pct": 55, "test_error_pct": None, "best_val_error_pct": 50},
        {"step": 5, "epoch": 1, "val_error_pct": 40, "test_error_pct": 7, "best_val_error_pct": 40},
        {"step": 6, "epoch": 1.2, "val_error_pct": 40, "test_error_pct": None, "best_val_error_pct": 40},
        {"step": 8, "epoch": 1.6, "val_error_pct": 60, "test_error_pct": None, "best_val_error_pct": 40}]


def test_without_validation_the_latest_evaluation_is_selected(tmp_path):
    errors = Scripted(val=[], test=[9, 12, 11])
    ev, _ = evaluator(errors, tmp_path, has_val=False)
    assert ev.best["val_error_pct"] is None
    for e in (1, 2, 3):
        record = ev.run(e, e, epoch_end=True)
        assert record["val_error_pct"] is None
    assert errors.calls == ["test"] * 3  # no validation set is ever asked for
    assert (ev.best["epoch"], ev.best["test_error_pct"]) == (3, 11)  # the last, not the lowest


def test_top5_is_kept_with_the_selection(tmp_path):
    errors = Scripted(val=[50, 60], test=[9, 8])
    ev, _ = evaluator(errors, tmp_path, top5=True)
    first = ev.run(1, 1, epoch_end=True)
    ev.run(2, 2, epoch_end=True)
    assert (first["val_top5_error_pct"], first["test_top5_error_pct"]) == (60, 19)
    assert (ev.best["test_error_pct"], ev.best["test_top5_error_pct"]) == (9, 19)


def test_step_evaluations_are_due_every_n_steps_but_not_at_the_epoch_end(tmp_path):
    ev, _ = evaluator(Scripted([], []), tmp_path, every_steps=3)
    # 5 steps an epoch, global steps 1..10: due at 3, 6 and 9; step 10 ends epoch 2 (left to
    # the epoch-end evaluation), and so would step 5 if 5 were a multiple of 3.
    due = [step for step in range(1, 11) if ev.due_inside_epoch((step - 1) % 5 + 1, 5, step)]
    assert due == [3, 6, 9]
    assert not ev.due_inside_epoch(5, 5, 15)  # a multiple of 3 that ends an epoch
    never, _ = evaluator(Scripted([], []), tmp_path, every_steps=None)
    assert not any(never.due_inside_epoch(s, 5, s) for s in range(1, 6))


def test_step_curves_go_to_tensorboard_by_global_step(tmp_path):
    """What sdrun.engine.log.RunLog hands each evaluation's record to: the by_step/ event file."""
    ev, _ = evaluator(Scripted(val=[50, 40], test=[9, 8]), tmp_path, every_steps=2)
    board = RunBoard.open(compose_cfg("eval_every_steps=2"), tmp_path / "main", num_blocks=3, start_epoch=0,
                          start_step=0)
    board.evaluation(ev.run(2, 0.5, epoch_end=False))
    board.evaluation(ev.run(4, 1, epoch_end=True))
    board.step_writer.close()
    board.writer.close()
    points = {}
    for path in (tmp_path / "main" / "by_step").glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                points.setdefault(v.tag, []).append((event.step, tensor_util.make_ndarray(v.tensor).item()))
    assert points == {"error_by_step/val": [(2, 50), (4, 40)], "error_by_step/test": [(2, 9), (4, 8)]}


def test_before_any_evaluation_nothing_is_selected(tmp_path):
    with_val, _ = evaluator(Scripted([], []), tmp_path)
    assert with_val.best == {"val_error_pct": math.inf, "epoch": None, "step": None, "test_error_pct": None,
                             "test_top5_error_pct": None}
    without_val, _ = evaluator(Scripted([], []), tmp_path, has_val=False)
    assert without_val.best["val_error_pct"] is None
