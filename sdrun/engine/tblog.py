"""A run's TensorBoard output: the per-epoch scalars, and beyond them gradients per block,
active depth, learning-rate drops, a custom-scalars layout and the HParams entries.

Per-epoch scalars (`RunBoard.epoch`): loss/train, error/{train,val,test}[_top5], lr,
time/epoch_train_s, throughput/train_images_per_s, depth/active_blocks_{mean,expected}.

Tags (one point per epoch, step = epoch):
  grad/block_001 ... grad/block_NNN  mean |grad| of block l's first conv, over the steps it ran
  grad/first_block                   the same for l = 1: the paper's Fig. 7 curve
  grad/model_norm                    mean over the epoch's steps of the whole model's gradient L2 norm
  grad_steps/block_NNN               steps of the epoch in which block l ran
  depth/active_blocks                histogram: how many blocks ran per step
  lr_drop                            1 on the first epoch of a lower learning rate, else 0
  grad_hist/block_NNN                optional (log.grad_histograms_every): the last step's first-conv
                                     gradient values of each block that ran in it
  hparams/test_error_at_best_val_pct, hparams/train_time_s   at the end, for the HParams table

The HParams experiment config and session info are written into the run's own event file
through SummaryWriter.file_writer (SummaryWriter.add_hparams would write them into an
extra sub-run). Every run of a sweep writes the same experiment config (hyper-parameter
names, domains that do not depend on the run, metric tags), so the HParams dashboard,
which reads one of them, compares all runs of a `-m` sweep.
"""

from __future__ import annotations

import importlib.resources
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from torch.utils.tensorboard import SummaryWriter

from sdrun.engine.gradstats import GradStats
from sdrun.rundir import HEADLINE
from sdrun.config import Survival

FIRST_BLOCK_TAG = "grad/first_block"
MODEL_NORM_TAG = "grad/model_norm"
ACTIVE_HIST_TAG = "depth/active_blocks"
LR_DROP_TAG = "lr_drop"
TEST_AT_BEST_VAL_TAG = "hparams/test_error_at_best_val_pct"
TRAIN_TIME_TAG = "hparams/train_time_s"

DESCRIPTIONS = {
    "block": "Mean absolute gradient of the loss w.r.t. the weights of block {l}'s first convolution, "
             "averaged over the optimisation steps of the epoch in which the block ran (a dropped block "
             "has no gradient that step and is not counted; see grad_steps/ for the count). "
             "Gradient of the loss only, before weight decay and momentum.",
    "first_block": "Mean absolute gradient of the first convolution of the first residual block (l = 1), "
                   "averaged over the steps of the epoch in which it ran: the paper's Fig. 7. Stochastic "
                   "depth keeps it larger than constant depth, most visibly after each lr drop.",
    "steps": "Number of optimisation steps of the epoch in which block {l} ran (its gate was open).",
    "model_norm": "L2 norm of the whole model's loss gradient (dropped blocks contribute zeros), "
                  "averaged over the epoch's steps.",
    "lr_drop": "1 on the first epoch whose learning rate is lower than the previous epoch's, else 0.",
}


def block_tag(prefix: str, l: int, num_blocks: int) -> str:
    """'grad/block_001': 1-based block index, zero-padded so the tags sort by depth."""
    return f"{prefix}/block_{l:0{max(3, len(str(num_blocks)))}d}"


def dataset_names() -> list[str]:
    """The dataset config group's options: a domain that is the same for every run of a sweep."""
    group = importlib.resources.files("sdrun.conf").joinpath("dataset")
    return sorted(p.name.removesuffix(".yaml") for p in group.iterdir() if p.name.endswith(".yaml"))


def hparam_values(cfg: DictConfig) -> dict:
    return {"dataset": cfg.dataset.name, "depth": cfg.depth, "pL": cfg.pL, "survival": cfg.survival.value,
            "seed": cfg.seed, "lr": cfg.optim.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size}


class AnyNumber(hp.Domain):
    """A numeric hyper-parameter with no bounds declared: typed FLOAT64 (so the HParams
    dashboard gives it an open interval filter and a linear axis) without an interval that
    one run could not know for the whole sweep."""

    @property
    def dtype(self):
        return float

    def sample_uniform(self, rng=None):
        raise NotImplementedError("an open domain cannot be sampled")

    def update_hparam_info(self, hparam_info: api_pb2.HParamInfo) -> None:
        hparam_info.type = api_pb2.DATA_TYPE_FLOAT64


def hparams_config(names: list[str]) -> list[hp.HParam]:
    """HParam declarations. Every run of a sweep must write the same ones (the dashboard reads
    one run's), so domains are only given where they are fixed whatever the run: pL in
    [0, 1], the survival rules, the dataset group's options."""
    domains = {"pL": hp.RealInterval(0.0, 1.0), "survival": hp.Discrete([s.value for s in Survival]),
               "dataset": hp.Discrete(dataset_names())}
    return [hp.HParam(name, domains.get(name, AnyNumber())) for name in names]


METRICS = [
    hp.Metric(TEST_AT_BEST_VAL_TAG, display_name="test error at best val (%)",
              description="Test error at the epoch of lowest validation error (the paper's protocol)."),
    hp.Metric(TRAIN_TIME_TAG, display_name="train time (s)",
              description="Training time, evaluation excluded."),
    hp.Metric("error/val", display_name="val error (%), last epoch", dataset_type=hp.Metric.VALIDATION),
    hp.Metric("error/test", display_name="test error (%), last epoch"),
    hp.Metric("loss/train", display_name="train loss, last epoch", dataset_type=hp.Metric.TRAINING),
]


def custom_scalars_layout() -> dict:
    """Charts that overlay related curves; tags are regular expressions, so one layout fits any L."""
    return {
        "gradients per block (paper Fig. 7)": {
            "mean |grad| of each block's first conv": ["Multiline", [r"^grad/block_\d+$"]],
            "block 1 (Fig. 7) and model gradient norm": ["Multiline", [f"^{FIRST_BLOCK_TAG}$", f"^{MODEL_NORM_TAG}$"]],
            "steps each block ran": ["Multiline", [r"^grad_steps/block_\d+$"]],
        },
        "depth and schedule": {
            "active blocks: measured vs expected": ["Multiline", [r"^depth/active_blocks_(mean|expected)$"]],
            "learning rate and its drops": ["Multiline", [r"^lr$", f"^{LR_DROP_TAG}$"]],
        },
        "error": {"train / val / test error (%)": ["Multiline", [r"^error/(train|val|test)$"]]},
    }


class RunBoard:
    """A run's TensorBoard event files: the per-epoch one in the run directory and, with
    eval_every_steps, the step-axis one in by_step/ (its own file, so a resumed run can purge it
    by step while the per-epoch curves are purged by epoch)."""

    @classmethod
    def open(cls, cfg: DictConfig, run_dir, num_blocks: int, start_epoch: int, start_step: int) -> "RunBoard":
        """purge_step hides points that a killed attempt logged after the checkpoint it resumes
        from: by epoch here, by step in by_step/."""
        writer = SummaryWriter(str(run_dir), purge_step=start_epoch + 1 if start_epoch else None)
        board = cls(writer, num_blocks, cfg.log.grad_histograms_every)
        if cfg.eval_every_steps:
            board.step_writer = SummaryWriter(str(Path(run_dir) / "by_step"),
                                              purge_step=start_step + 1 if start_step else None)
        board.start(cfg)
        return board

    def close(self, results: dict) -> None:
        self.end(results)
        self.writer.close()
        if self.step_writer is not None:
            self.step_writer.close()

    def __init__(self, writer: SummaryWriter, num_blocks: int, grad_histograms_every: int = 0):
        self.writer = writer
        self.step_writer: SummaryWriter | None = None  # by_step/, with eval_every_steps
        self.num_blocks = num_blocks
        self.grad_histograms_every = grad_histograms_every
        self.described: set[str] = set()

    def epoch(self, record: dict, expected_depth: float, grad_stats: GradStats | None = None) -> None:
        """An epoch's metrics.jsonl record: its scalars and the extras, then a flush."""
        e = record["epoch"]
        scalars = {"loss/train": record["train_loss"], "error/train": record["train_error_pct"],
                   "error/val": record["val_error_pct"], "error/test": record["test_error_pct"],
                   "error/val_top5": record.get("val_top5_error_pct"),
                   "error/test_top5": record.get("test_top5_error_pct"),
                   "lr": record["lr"], "time/epoch_train_s": record["epoch_train_time_s"],
                   "throughput/train_images_per_s": record["images_per_s"],
                   "depth/active_blocks_mean": record["active_blocks_mean"],
                   "depth/active_blocks_expected": expected_depth}
        self.write_epoch(record, e, grad_stats)
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, e)
        self.writer.flush()

    def evaluation(self, record: dict) -> None:
        """An evaluation's errors on the step axis (error_by_step/*)."""
        for key, tag in (("val_error_pct", "val"), ("test_error_pct", "test"),
                         ("val_top5_error_pct", "val_top5"), ("test_top5_error_pct", "test_top5")):
            if record.get(key) is not None:
                self.step_writer.add_scalar(f"error_by_step/{tag}", record[key], record["step"])

    def scalar(self, tag: str, value: float, step: int, description: str) -> None:
        """A scalar whose first point carries the tag's description (TensorBoard reads the first).

        Tensor-style scalar summaries (as TF2 writes them), because TensorBoard's fast loader
        drops the description of old-style simple_value ones; every point of a tag uses the
        same style. Readers: TensorBoard, EventFileLoader, plugin_event_accumulator.
        """
        if tag in self.described:
            self.writer.add_scalar(tag, value, step, new_style=True)
        else:
            self.described.add(tag)
            self.writer.file_writer.add_summary(scalar_pb(tag, value, description), step)

    def start(self, cfg: DictConfig) -> None:
        self.writer.add_custom_scalars(custom_scalars_layout())
        values = hparam_values(cfg)
        self.writer.file_writer.add_summary(hp.hparams_config_pb(hparams_config(list(values)), METRICS))
        self.writer.file_writer.add_summary(hp.hparams_pb(values))

    def write_epoch(self, record: dict, epoch: int, grad_stats: GradStats | None = None) -> None:
        """Write an epoch's metrics.jsonl record's gradient, depth and lr-drop entries."""
        L = self.num_blocks
        if "grad_mean_abs" in record:
            for l, (value, steps) in enumerate(zip(record["grad_mean_abs"], record["grad_steps"]), start=1):
                if value is not None:  # never ran this epoch: no point rather than a fake 0
                    self.scalar(block_tag("grad", l, L), value, epoch, DESCRIPTIONS["block"].format(l=l))
                self.scalar(block_tag("grad_steps", l, L), steps, epoch, DESCRIPTIONS["steps"].format(l=l))
            if record["grad_mean_abs"][0] is not None:
                self.scalar(FIRST_BLOCK_TAG, record["grad_mean_abs"][0], epoch, DESCRIPTIONS["first_block"])
            self.scalar(MODEL_NORM_TAG, record["grad_norm"], epoch, DESCRIPTIONS["model_norm"])
        hist = record["active_blocks_hist"]
        self.writer.add_histogram(ACTIVE_HIST_TAG, np.repeat(np.arange(L + 1), hist), epoch,
                                  bins=np.arange(L + 2) - 0.5)
        self.scalar(LR_DROP_TAG, float(record["lr_drop"]), epoch, DESCRIPTIONS["lr_drop"])
        every = self.grad_histograms_every
        if grad_stats is not None and every and epoch % every == 0:
            self.write_grad_histograms(grad_stats, epoch)

    @torch.no_grad()
    def write_grad_histograms(self, grad_stats: GradStats, epoch: int) -> None:
        # The gradients still hold the epoch's last step (zeroed only before the next backward).
        for l, (weight, ran) in enumerate(zip(grad_stats.conv_weights, grad_stats.last_gates), start=1):
            if ran:
                self.writer.add_histogram(block_tag("grad_hist", l, self.num_blocks),
                                          weight.grad.float().cpu(), epoch)

    def end(self, results: dict) -> None:
        """The headline metrics as scalars for the HParams table, and the session's end."""
        step = results["epochs"]
        self.writer.add_scalar(TEST_AT_BEST_VAL_TAG, results[HEADLINE], step)
        self.writer.add_scalar(TRAIN_TIME_TAG, results["train_time_s"], step)
        end_info = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
            status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time()))
        self.writer.file_writer.add_summary(summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=hp_metadata.SESSION_END_INFO_TAG, metadata=hp_metadata.create_summary_metadata(end_info),
            tensor=hp_metadata.NULL_TENSOR)]), step)
        self.writer.flush()
