"""`sdrun analyze`: test the paper's "implicit ensemble" explanation on a trained run.

Training samples one of 2^L sub-networks per step (block l present with probability p_l);
the paper's test-time rule (every branch scaled by p_l) is meant to approximate the
average of that ensemble. For a run's checkpoint, on its test split, this measures:

- the test error of the test-time rule, and of the full network with every branch unscaled;
- a Monte-Carlo ensemble: the mean softmax of K sub-networks with gates drawn from the
  training survival probabilities, for K = 1, 2, 4, ..., K_max, and the error of each
  sampled sub-network alone;
- a lesion study: block l alone removed at test time (its shortcut only), for each l;
- the error with m blocks removed at random, m = 1, 2, 4, ..., L.

BatchNorm: every network here runs in eval mode, with the running statistics that training
accumulated. Those are a mixture over the sub-networks seen in training (a block's BN only
updates on steps where the block ran), so a sampled sub-network is evaluated with shared
statistics, not with statistics of its own. `--bn-recompute N` also evaluates the same
sampled sub-networks with BN statistics recomputed for each one on N training images
(`own_bn_statistics`); lesions and removals always use the running statistics.

All networks are evaluated on the whole (or a fixed random subset of the) test split in
batches; a lesion shares the test-rule forward up to the removed block with every other
lesion, so the lesion study costs about half of L full passes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sdrun.tools.analyze_plots import plot_all, run_label
from sdrun.errors import ArgParser, UserError, print_error
from sdrun.data.batches import Normalizer, eval_batches
from sdrun.data.readers import Split, load_image_data
from sdrun.files import write_json
from sdrun.model.resnet import model_for
from sdrun.engine.runtime import resolve_device
from sdrun.engine.state import SavedRun
from sdrun.rundir import CHECKPOINT
from sdrun.rng import derive_seed
from sdrun.model.stochastic import GateSampler, run_blocks

# The datasets whose whole test split is held as uint8 tensors (sdrun.data.readers.load_image_data).
SMALL_IMAGE_DATASETS = ("cifar10", "cifar100", "svhn", "digits")

BN_STATISTICS = ("eval mode: every network (test rule, sampled sub-networks, lesions, removals) uses "
                 "the BatchNorm running statistics accumulated during training")


class AnalyzeError(UserError, ValueError):
    """A missing or unusable run, checkpoint or option."""


# ---------------------------------------------------------------- loading a run

@dataclass
class TrainedRun:
    run_dir: Path
    checkpoint: Path
    epoch: int | None
    cfg: DictConfig
    model: nn.Module
    normalizer: Normalizer
    train: Split  # the training split without the validation images, as in training
    test: Split


def load_trained_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
             data_root: str | None = None) -> TrainedRun:
    """The run's model (eval mode, on `device`), normaliser, resolved config and test split."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalyzeError(f"run directory {run_dir} does not exist")
    path = Path(checkpoint) if checkpoint else run_dir / CHECKPOINT
    if not path.is_file():
        raise AnalyzeError(f"no checkpoint at {path} (train with checkpoint=true, or pass --checkpoint PATH)")
    saved = SavedRun.load(path, with_weights=True)  # one-line CheckpointError for unreadable, unsafe or foreign files
    cfg = OmegaConf.create(saved.config)
    if cfg.dataset.name not in SMALL_IMAGE_DATASETS:
        # Its test split is decoded from JPEGs per batch and normalised per channel; the
        # analysis holds the whole split normalised on the device, which ImageNet's 50k
        # 224x224 images would not fit, and would take hours of passes on the ResNet-152.
        raise AnalyzeError(f"{run_dir} holds a run on {cfg.dataset.name}; sdrun analyze works on runs of the "
                           f"32x32 datasets ({', '.join(SMALL_IMAGE_DATASETS)})")
    if data_root is not None:
        cfg.dataset.root = data_root
    try:
        model = model_for(cfg)
        model.load_state_dict(saved.model)
    except (ValueError, RuntimeError) as e:  # a config this version cannot build, or weights that do not fit
        raise AnalyzeError(f"{path}: cannot rebuild the model from its config: {e}") from None
    model.to(device).eval()
    normalizer = Normalizer(saved.normalizer["mean"], saved.normalizer["std"]).to(device)
    data = load_image_data(cfg.dataset, cfg.seed)
    return TrainedRun(run_dir, path, saved.epoch, cfg, model, normalizer, data.train, data.test)


# ---------------------------------------------------------------- evaluating gated networks

class SubnetworkEvaluator:
    """A split (the test split, normally), normalised once into device batches, and the
    logits of gated networks on it.

    `gates` as in the model: one entry per block, True = run unscaled, False = removed
    (shortcut only), None = test rule (branch x p_l); gates=None is the test-time network.
    """

    def __init__(self, model: nn.Module, split: Split, normalizer: Normalizer, batch_size: int):
        device = normalizer.mean.device
        self.model = model
        self.batches = [x for x, _ in eval_batches(split.to(device), normalizer, batch_size)]
        self.labels = split.labels.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    @torch.inference_mode()
    def logits(self, gates: Sequence[bool | None] | None = None) -> torch.Tensor:
        return torch.cat([self.model(x, gates) for x in self.batches])

    @torch.inference_mode()
    def lesion_logits(self, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """{l: logits with block l (0-based) alone removed, every other block on the test rule}.

        Equal to `logits(gates)` with gates[l] = False and None elsewhere; the test-rule
        forward through blocks before l is computed once per batch and shared by all lesions.
        """
        blocks = sorted(set(blocks))
        out: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
        model = self.model
        for x in self.batches:
            h, done = model.stem(x), 0
            for b in blocks:
                h = run_blocks(model.blocks[done:b], h, None)  # the shared test-rule prefix
                done = b
                removed = model.blocks[b](h, False)  # the shortcut only; never modifies h
                out[b].append(model.head(run_blocks(model.blocks[b + 1:], removed, None)))
        return {b: torch.cat(parts) for b, parts in out.items()}

    def error_pct(self, scores: torch.Tensor) -> float:
        """Top-1 error (%) of logits or probabilities (N, C)."""
        return 100.0 * (scores.argmax(1) != self.labels).sum().item() / len(self.labels)


@contextmanager
def own_bn_statistics(model: nn.Module, batches: Sequence[torch.Tensor],
                      gates: Sequence[bool | None]) -> Iterator[None]:
    """Within the block, BatchNorm running statistics are those of the sub-network `gates`
    on `batches` (an equal-weight average over batches, momentum=None); restored on exit.

    BNs of removed blocks are not run, so they keep reset statistics, which that
    sub-network never uses.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(bn.momentum, {k: v.clone() for k, v in bn.state_dict().items()}) for bn in bns]
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        with torch.no_grad():
            for x in batches:
                model(x, gates)
        model.eval()
        yield
    finally:
        model.eval()
        for bn, (momentum, state) in zip(bns, saved):
            bn.momentum = momentum
            bn.load_state_dict(state)


def doubling(limit: int) -> list[int]:
    """1, 2, 4, ... up to limit, with limit itself as the last point."""
    points = [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]
    return points + ([limit] if points[-1] != limit else [])


def _mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _stream_seeds(seed: int, n: int) -> list[int]:
    """n independent seeds from the run seed's "analyze" stream (gates, removals, subset)."""
    children = np.random.SeedSequence(derive_seed(seed, "analyze")).spawn(n)
    return [int(c.generate_state(1, np.uint64)[0]) >> 1 for c in children]


def monte_carlo_ensemble(ev: SubnetworkEvaluator, probs: Sequence[float], k_max: int, seed: int,
                         bn_batches: Sequence[torch.Tensor] | None = None) -> dict:
    """Softmax average of k_max sub-networks drawn with the training survival probabilities.

    bn_batches: recompute each sub-network's BN statistics on these (normalised) images
    first; None = the running statistics from training.
    """
    sampler = GateSampler(probs, seed)
    report_at = set(doubling(k_max))
    total = None
    samples, curve = [], []
    for k in range(1, k_max + 1):
        gates = sampler.draw()
        if bn_batches is None:
            p = ev.logits(gates).softmax(1)
        else:
            with own_bn_statistics(ev.model, bn_batches, gates):
                p = ev.logits(gates).softmax(1)
        total = p if total is None else total + p
        samples.append({"active_blocks": sum(gates), "error_pct": ev.error_pct(p)})
        if k in report_at:
            curve.append({"k": k, "error_pct": ev.error_pct(total)})
    mean, std = _mean_and_std([s["error_pct"] for s in samples])
    return {"ensemble": curve,
            "subnetworks": {"error_pct_mean": mean, "error_pct_std": std,
                            "active_blocks_mean": statistics.fmean(s["active_blocks"] for s in samples),
                            "samples": samples}}


def lesion_study(ev: SubnetworkEvaluator, blocks: Sequence[int], transition: Sequence[bool]) -> list[dict]:
    logits = ev.lesion_logits(blocks)
    return [{"block": b + 1, "transition": transition[b], "error_pct": ev.error_pct(out)}
            for b, out in logits.items()]


def random_removal(ev: SubnetworkEvaluator, num_blocks: int, draws: int, seed: int) -> list[dict]:
    """Error with m blocks removed at random (the rest on the test rule), m = 1, 2, 4, ..., L."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for m in doubling(num_blocks):
        errors = []
        for _ in range(draws if m < num_blocks else 1):  # removing all L blocks has one outcome
            gates: list[bool | None] = [None] * num_blocks
            for b in torch.randperm(num_blocks, generator=g)[:m].tolist():
                gates[b] = False
            errors.append(ev.error_pct(ev.logits(gates)))
        mean, std = _mean_and_std(errors)
        rows.append({"num_removed": m, "draws": len(errors), "error_pct_mean": mean,
                     "error_pct_std": std, "error_pct": errors})
    return rows


def analyze_run(run: TrainedRun, k_max: int = 32, lesion: Sequence[int] | None = None, removal_draws: int = 8,
                seed: int | None = None, test_images: int | None = None, batch_size: int = 500,
                bn_recompute: int = 0) -> dict:
    """Every measurement for one run. `lesion`: 0-based blocks (None = all).
    bn_recompute: also evaluate the sampled sub-networks with BN statistics recomputed on
    this many training images (0 = no)."""
    t0 = time.perf_counter()
    cfg, model = run.cfg, run.model
    probs = model.survival_probs
    num_blocks = len(probs)
    seed = cfg.seed if seed is None else seed
    gate_seed, removal_seed, subset_seed, bn_seed = _stream_seeds(seed, 4)
    lesion = range(num_blocks) if lesion is None else lesion
    if any(not 0 <= b < num_blocks for b in lesion):
        raise AnalyzeError(f"--lesion blocks must lie in 1..{num_blocks} for {run.run_dir} (L = {num_blocks})")

    split = run.test
    if test_images is not None and test_images < len(split):
        # A fixed random subset: image-folder test sets are sorted by class.
        idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(subset_seed))[:test_images]
        idx = idx.sort().values
        split = Split(split.images[idx], split.labels[idx])
    ev = SubnetworkEvaluator(model, split, run.normalizer, batch_size)
    transition = [not isinstance(b.shortcut, nn.Identity) for b in model.blocks]

    result = {
        "run_dir": str(run.run_dir), "checkpoint": str(run.checkpoint), "epoch": run.epoch,
        "dataset": cfg.dataset.name, "depth": cfg.depth, "num_blocks": num_blocks, "pL": cfg.pL,
        "survival": cfg.survival, "scaling": cfg.model.scaling, "survival_probs": probs,
        "expected_active_blocks": sum(probs), "test_images": len(ev), "seed": seed,
        "bn_statistics": BN_STATISTICS,
        "test_rule_error_pct": ev.error_pct(ev.logits(None)),
        "all_open_error_pct": ev.error_pct(ev.logits([True] * num_blocks)),
    }
    result.update(monte_carlo_ensemble(ev, probs, k_max, gate_seed))
    result["bn_recomputed"] = None
    if bn_recompute:
        # The same sub-networks (same gate seed), each with BN statistics of its own, computed
        # on a fixed random subset of training images in training-size batches.
        idx = torch.randperm(len(run.train), generator=torch.Generator().manual_seed(bn_seed))[:bn_recompute]
        subset = Split(run.train.images[idx], run.train.labels[idx]).to(run.normalizer.mean.device)
        bn_batches = [x for x, _ in eval_batches(subset, run.normalizer, cfg.batch_size)]
        result["bn_recomputed"] = {"train_images": len(subset), "batch_size": cfg.batch_size,
                                   **monte_carlo_ensemble(ev, probs, k_max, gate_seed, bn_batches)}
    result["lesion"] = lesion_study(ev, list(lesion), transition)
    result["removal"] = random_removal(ev, num_blocks, removal_draws, removal_seed) if removal_draws else []
    result["seconds"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------- the report

def format_table(results: Sequence[dict]) -> str:
    """One column per run, one row per measurement (test error in %)."""
    names = [f"[{chr(65 + i)}]" for i in range(len(results))]
    lines = []
    for name, r in zip(names, results):
        scaling = "" if r["scaling"] == "paper" else f", model.scaling={r['scaling']} (gate open: branch / p_l)"
        lines.append(f"{name} {r['run_dir']}: {run_label(r)}, {r['dataset']} depth {r['depth']} "
                     f"(L={r['num_blocks']}){scaling}, checkpoint epoch {r['epoch']}, {r['test_images']} test images")
    lines.append(f"BatchNorm: {BN_STATISTICS}.")
    for name, r in zip(names, results):
        if r["bn_recomputed"]:
            lines.append(f"{name} 'own BN stats' rows: the same sub-networks with BatchNorm statistics "
                         f"recomputed for each on {r['bn_recomputed']['train_images']} training images.")
    rows: dict[str, list[str]] = {}

    def put(key: str, i: int, text: str) -> None:
        rows.setdefault(key, ["-"] * len(results))[i] = text

    for i, r in enumerate(results):
        sub = r["subnetworks"]
        put("test-time rule (branch x p_l)", i, f"{r['test_rule_error_pct']:.2f}")
        put("all gates open (branches unscaled)", i, f"{r['all_open_error_pct']:.2f}")
        put("sampled sub-network, mean +- std", i,
            f"{sub['error_pct_mean']:.2f} +- {sub['error_pct_std']:.2f}")
        put("  its active blocks, mean", i, f"{sub['active_blocks_mean']:.2f} of {r['num_blocks']}")
        for point in r["ensemble"]:
            put(f"MC ensemble of K={point['k']}", i, f"{point['error_pct']:.2f}")
        if r["bn_recomputed"]:
            own = r["bn_recomputed"]
            sub = own["subnetworks"]
            put("sampled sub-network, own BN stats", i, f"{sub['error_pct_mean']:.2f} +- {sub['error_pct_std']:.2f}")
            for point in own["ensemble"]:
                put(f"MC ensemble of K={point['k']}, own BN stats", i, f"{point['error_pct']:.2f}")
        for row in r["lesion"]:
            put(f"block {row['block']} removed{' (transition)' if row['transition'] else ''}", i,
                f"{row['error_pct']:.2f}")
        for row in r["removal"]:
            m = row["num_removed"]
            put(f"{m} random block{'s' if m > 1 else ''} removed, mean +- std", i,
                f"{row['error_pct_mean']:.2f} +- {row['error_pct_std']:.2f}")
    width = max(len(k) for k in rows)
    col = max(14, *(len(v) for vals in rows.values() for v in vals))
    lines.append("")
    lines.append(f"{'test error (%)':<{width}}  " + "  ".join(f"{n:>{col}}" for n in names))
    lines += [f"{k:<{width}}  " + "  ".join(f"{v:>{col}}" for v in vals) for k, vals in rows.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _lesion_set(text: str) -> list[int] | None:
    """'all', 'none', or 1-based block numbers and ranges: '1,5,9' or '1-18,27'."""
    if text == "all":
        return None
    if text == "none":
        return []
    blocks = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            blocks += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected all, none or block numbers like 1,5,9 or 1-18, got {text!r}")
    if not blocks or min(blocks) < 1:
        raise argparse.ArgumentTypeError(f"block numbers start at 1, got {text!r}")
    return [b - 1 for b in blocks]


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="sdrun analyze", description=(
        "Test the implicit-ensemble explanation on a trained run: test-time rule vs Monte-Carlo "
        "ensembles of sampled sub-networks, lesions of single blocks, random removal of blocks. "
        "Writes analysis.json, report.txt and PNG plots to --out."))
    p.add_argument("run_dir", help="a run directory of `sdrun train` (with checkpoint.pt)")
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint to load instead of RUN_DIR/checkpoint.pt")
    p.add_argument("--compare", metavar="RUN_DIR", help="a second run analysed the same way "
                   "(e.g. the constant-depth baseline), shown side by side")
    p.add_argument("--compare-checkpoint", metavar="PATH", help="checkpoint of the --compare run")
    p.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/analysis)")
    p.add_argument("--k-max", type=_positive, default=32, metavar="K",
                   help="sub-networks in the Monte-Carlo ensemble; reported at K = 1, 2, 4, ..., K_MAX (default 32)")
    p.add_argument("--lesion", type=_lesion_set, default=None, metavar="BLOCKS",
                   help="blocks to remove one at a time: all (default), none, or 1-based numbers like 1,5,9 or 1-18")
    p.add_argument("--removal-draws", type=_non_negative, default=8, metavar="N",
                   help="random subsets per number of removed blocks (default 8; 0 skips the study)")
    p.add_argument("--test-images", type=_positive, default=None, metavar="N",
                   help="evaluate on a fixed random subset of this many test images (default: all)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="seed of the sampled gates and subsets (default: the run's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=_positive, default=500, metavar="N", help="evaluation batch size (default 500)")
    p.add_argument("--bn-recompute", type=_non_negative, default=0, metavar="N",
                   help="also evaluate the sampled sub-networks with BatchNorm statistics recomputed for "
                        "each on N training images (default 0: off)")
    p.add_argument("--data-root", metavar="DIR", help="dataset.root to read the test split from, if not the run's")
    return p


def analyze(args: argparse.Namespace) -> list[dict]:
    device = str(resolve_device(args.device))
    targets = [(args.run_dir, args.checkpoint)]
    if args.compare:
        targets.append((args.compare, args.compare_checkpoint))
    results = []
    for run_dir, checkpoint in targets:
        run = load_trained_run(run_dir, checkpoint, device, args.data_root)
        results.append(analyze_run(run, args.k_max, args.lesion, args.removal_draws, args.seed,
                                   args.test_images, args.batch_size, args.bn_recompute))
    return results


def main(argv: list[str]) -> int:
    from omegaconf.errors import OmegaConfBaseException

    from sdrun.data.readers import DataError

    args = build_parser().parse_args(argv)
    try:
        results = analyze(args)
        out = Path(args.out) if args.out else Path(args.run_dir) / "analysis"
        out.mkdir(parents=True, exist_ok=True)
    except (UserError, OmegaConfBaseException, OSError) as e:
        hint = " (--data-root DIR reads the test split from elsewhere)" if isinstance(e, DataError) else ""
        print_error("sdrun analyze", e, hint)
        return 2
    table = format_table(results)
    write_json(out / "analysis.json", {"command": ["sdrun", "analyze", *argv], "runs": results})
    (out / "report.txt").write_text(table)
    plots = plot_all(results, out)
    print(table, end="")
    print(f"\nwrote {out / 'analysis.json'}, {out / 'report.txt'}, " + ", ".join(str(p) for p in plots))
    return 0


if __name__ == "__main__":  # python -m sdrun.tools.analyze RUN_DIR ...
    sys.exit(main(sys.argv[1:]))
