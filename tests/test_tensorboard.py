"""The real TensorBoard server over a tiny run and a two-job multirun, queried through its
HTTP data API: per-block gradient tags, the custom-scalars layout and the HParams entries."""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import read_jsonl

READY_TIMEOUT_S = 90
RUNS = ["run", "sweep/0", "sweep/1"]  # TensorBoard's run names: the run dirs under the log dir


def tensorboard_command() -> list[str]:
    """The `tensorboard` console script of this environment, else the same program via -m."""
    script = Path(sys.executable).with_name("tensorboard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tensorboard.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    def __init__(self, logdir: Path):
        self.port = free_port()
        self.log = open(logdir.parent / "tensorboard.log", "w")
        self.proc = subprocess.Popen(
            [*tensorboard_command(), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(self.port),
             "--reload_interval", "1"], stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def wait_until(self, loaded, what: str):
        """Poll (bounded) until the server answers and loaded(self) holds."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited with {self.proc.returncode}: "
                                   f"{Path(self.log.name).read_text()[-2000:]}")
            try:
                if loaded(self):
                    return
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"tensorboard did not {what} within {READY_TIMEOUT_S}s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def logdir(console_runs) -> Path:
    """One tiny run (lr drop after epoch 1) and a two-job pL sweep, in one log directory
    (the real console-script runs shared with test_cli.py)."""
    return console_runs


@pytest.fixture(scope="module")
def tensorboard(logdir):
    tb = TensorBoard(logdir)
    try:
        # Loaded: every run's last tag (written when the run finished) is visible.
        tb.wait_until(lambda tb: all("hparams/train_time_s" in tb.get("data/plugin/scalars/tags").get(run, {})
                                     for run in RUNS), "load the runs")
        yield tb
    finally:
        tb.stop()
    assert tb.proc.poll() is not None


def test_metrics_jsonl_has_gradient_keys(logdir):
    for run in RUNS:
        for m in read_jsonl(logdir / run / "metrics.jsonl"):
            assert len(m["grad_mean_abs"]) == len(m["grad_steps"]) == 3 and len(m["active_blocks_hist"]) == 4
            assert sum(m["active_blocks_hist"]) == 3  # steps of the epoch
            assert sum(m["grad_steps"]) == sum(k * n for k, n in enumerate(m["active_blocks_hist"]))
            assert all((v is None) == (n == 0) for v, n in zip(m["grad_mean_abs"], m["grad_steps"]))
            assert m["grad_norm"] > 0 and all(v > 0 for v in m["grad_mean_abs"] if v is not None)
    assert [m["lr_drop"] for m in read_jsonl(logdir / "run" / "metrics.jsonl")] == [False, True]
    constant = read_jsonl(logdir / "sweep" / "1" / "metrics.jsonl")  # pL = 1: every block, every step
    assert all(m["grad_steps"] == [3, 3, 3] and m["active_blocks_hist"] == [0, 0, 0, 3] for m in constant)


def test_per_block_gradient_tags_and_points(tensorboard, logdir):
    tags = tensorboard.get("data/plugin/scalars/tags")
    for run in RUNS:
        metrics = read_jsonl(logdir / run / "metrics.jsonl")
        for l in range(1, 4):
            assert f"grad/block_{l:03d}" in tags[run] and f"grad_steps/block_{l:03d}" in tags[run]
            points = tensorboard.get(f"data/plugin/scalars/scalars?run={run}&tag=grad/block_{l:03d}")
            logged = [(m["epoch"], m["grad_mean_abs"][l - 1]) for m in metrics if m["grad_mean_abs"][l - 1] is not None]
            assert [(step, pytest.approx(value, rel=1e-6)) for _, step, value in points] == logged
        assert "averaged over the optimisation steps" in tags[run]["grad/block_001"]["description"]
        first = tensorboard.get(f"data/plugin/scalars/scalars?run={run}&tag=grad/first_block")
        assert [v for _, _, v in first] == pytest.approx([m["grad_mean_abs"][0] for m in metrics], rel=1e-6)
        norm = tensorboard.get(f"data/plugin/scalars/scalars?run={run}&tag=grad/model_norm")
        assert [s for _, s, _ in norm] == [1, 2]
    drops = tensorboard.get("data/plugin/scalars/scalars?run=run&tag=lr_drop")
    assert [(s, v) for _, s, v in drops] == [(1, 0.0), (2, 1.0)]
    hist = tensorboard.get("data/plugin/histograms/tags")
    assert all("depth/active_blocks" in hist[run] for run in RUNS)
    depth = tensorboard.get("data/plugin/histograms/histograms?run=sweep/1&tag=depth/active_blocks")
    assert [step for _, step, _ in depth] == [1, 2]
    for _, _, buckets in depth:  # pL = 1: all 3 blocks ran in each of the 3 steps
        assert sum(count for _, _, count in buckets) == 3
        assert all(left >= 2.5 or count == 0 for left, _, count in buckets)


def test_custom_scalars_layout_overlays_the_blocks(tensorboard):
    layout = tensorboard.get("data/plugin/custom_scalars/layout")
    charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
    # The three runs wrote the same layout; TensorBoard merges it into one set of charts.
    assert len([c for cat in layout["category"] for c in cat["chart"]]) == len(charts)
    (regex,) = charts["mean |grad| of each block's first conv"]
    tags = tensorboard.get("data/plugin/scalars/tags")["sweep/0"]
    assert sorted(t for t in tags if re.search(regex, t)) == ["grad/block_001", "grad/block_002", "grad/block_003"]


def test_hparams_table_compares_the_runs(tensorboard, logdir):
    experiment = tensorboard.get("data/plugin/hparams/experiment", {"experimentName": ""})
    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    assert set(infos) == {"dataset", "depth", "pL", "survival", "seed", "lr", "epochs", "batch_size"}
    assert infos["pL"]["type"] == infos["depth"]["type"] == "DATA_TYPE_FLOAT64"
    assert "digits" in infos["dataset"]["domainDiscrete"]
    metric_tags = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert metric_tags[:2] == ["hparams/test_error_at_best_val_pct", "hparams/train_time_s"]

    groups = tensorboard.get("data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})
    sessions = {s["name"]: (g["hparams"], s) for g in groups["sessionGroups"] for s in g["sessions"]}
    assert set(sessions) == set(RUNS) == set(tensorboard.get("data/runs"))  # no stray sub-runs
    for run in RUNS:
        hparams, session = sessions[run]
        results = json.loads((logdir / run / "results.json").read_text())
        assert hparams["pL"] == results["pL"] and hparams["seed"] == results["seed"]
        assert session["status"] == "STATUS_SUCCESS"
        metric = {m["name"]["tag"]: m for m in session["metricValues"]}
        assert metric["hparams/test_error_at_best_val_pct"]["value"] == pytest.approx(
            results["test_error_at_best_val_pct"], rel=1e-6)
        assert metric["hparams/test_error_at_best_val_pct"]["trainingStep"] == 2
        assert metric["hparams/train_time_s"]["value"] == pytest.approx(results["train_time_s"], rel=1e-6)
    assert sorted(sessions[r][0]["pL"] for r in ("sweep/0", "sweep/1")) == [0.5, 1.0]
