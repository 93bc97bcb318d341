"""Where a run's numbers go: `RunLog.epoch(record)` is the one place an epoch is written.

Rank 0 writes the run directory's files (their names: sdrun.rundir) and TensorBoard
(sdrun.engine.tblog); every rank logs to the console (train.log under Hydra; other ranks'
logging is quieted by sdrun.engine.distributed):
  metrics.jsonl   one line per epoch
  evals.jsonl     with eval_every_steps: one line per evaluation (epoch ends included)
  results.json    the headline numbers at the end
"""

from __future__ import annotations

import logging
from pathlib import Path

from sdrun.engine.setup import Run
from sdrun.engine.tblog import RunBoard
from sdrun.files import append_jsonl, rewrite_jsonl, write_json
from sdrun.rundir import EVALS, HEADLINE, METRICS, RESULTS

log = logging.getLogger("sdrun")


class RunLog:
    def __init__(self, run: Run, run_dir: Path):
        self.run, self.run_dir = run, Path(run_dir)
        cfg, state = run.cfg, run.state
        self.writes = run.ctx.is_main
        self.board = None
        if self.writes:
            if state.epoch:  # resumed: drop lines of an epoch whose checkpoint was never written
                rewrite_jsonl(self.run_dir / METRICS, lambda r: r["epoch"] <= state.epoch)
                rewrite_jsonl(self.run_dir / EVALS, lambda r: r["step"] <= state.step)
            self.board = RunBoard.open(cfg, self.run_dir, len(run.model.survival_probs), state.epoch, state.step)
        if state.epoch:
            log.info("resuming %s after epoch %d (step %d)", self.run_dir, state.epoch, state.step)
        self.start()

    def start(self) -> None:
        cfg, rt, ctx, data, model = self.run.cfg, self.run.rt, self.run.ctx, self.run.data, self.run.model
        num_blocks = len(model.survival_probs)
        log.info("run dir %s | %s depth %d (L=%d blocks, %s params) pL=%s %s | device %s precision=%s (eval %s) "
                 "channels_last=%s",
                 self.run_dir, cfg.dataset.name, cfg.depth, num_blocks,
                 f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", cfg.pL, cfg.survival.value,
                 rt.device, rt.precision, rt.eval_precision, rt.channels_last)
        log.info("data: %d train / %d val / %d test images; expected active blocks %.2f of %d",
                 len(data.train), len(data.val) if data.val else 0, len(data.test), self.run.expected_depth,
                 num_blocks)
        if ctx.distributed:
            log.info("distributed: %d processes, global batch %d (about %d per process), sync_bn=%s",
                     ctx.world_size, cfg.batch_size, -(-cfg.batch_size // ctx.world_size), cfg.sync_bn)

    def epoch(self, record: dict, clock: str) -> None:
        """An epoch's record: TensorBoard, the console, then metrics.jsonl (before the checkpoint,
        so a kill in between leaves a line the resumed run drops and redoes)."""
        if self.writes:
            self.board.epoch(record, self.run.expected_depth, self.run.grad_stats)
        log.info("epoch %d/%d | lr %.4g | train loss %.4f err %.2f%% | val %s | test %.2f%% | %.1fs %.0f img/s"
                 " | blocks %.2f/%.2f | %s", record["epoch"], self.run.cfg.epochs, record["lr"], record["train_loss"],
                 record["train_error_pct"],
                 "-" if record["val_error_pct"] is None else f"{record['val_error_pct']:.2f}%",
                 record["test_error_pct"], record["epoch_train_time_s"], record["images_per_s"],
                 record["active_blocks_mean"], self.run.expected_depth, clock)
        if self.writes:
            append_jsonl(self.run_dir / METRICS, record)

    def evaluation(self, record: dict) -> None:
        """An evaluation's record, with eval_every_steps: evals.jsonl and TensorBoard's step axis."""
        if self.writes and self.run.cfg.eval_every_steps:
            append_jsonl(self.run_dir / EVALS, record)
            self.board.evaluation(record)

    def finish(self, results: dict, train_time_s: float) -> None:
        if self.writes:
            write_json(self.run_dir / RESULTS, results)
            self.board.close(results)
        log.info("done: test error %.2f%% at best val epoch %s (final %.2f%%), training time %.1fs",
                 results[HEADLINE], results["best_val_epoch"], results["final_test_error_pct"], train_time_s)
