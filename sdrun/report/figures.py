"""`sdrun plot`: the paper's Figs. 3, 7 and 8 from the user's runs, as PNG and PDF.

Fig. 3        test error and training loss against epoch, constant vs stochastic depth
Fig. 4        test error against epoch, constant vs stochastic depth, for SVHN and for
              ResNet-1202 on CIFAR-10 (one panel each, side by side when both are there)
Fig. 7        mean |gradient| of the first block's first convolution against epoch, lr drops marked
Fig. 8 left   test error against pL, linear decay vs uniform, with the constant-depth level
Fig. 8 right  heatmap of test error over pL and depth

Curves are means over seeds with a +-1 std band. Every figure is drawn for each set of
runs that share dataset, depth and recipe (see sdrun.report.collect); a figure whose data is not in
the runs is skipped with a one-line reason. Figures are built with matplotlib's
object-oriented API (Figure, no pyplot state), so drawing needs no display.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sdrun.errors import ArgParser
from sdrun.report.collect import Group, RunsError, cohorts, load_groups, variant_labels
from sdrun.rundir import HEADLINE, METRICS
from sdrun.text import CONSTANT_DEPTH

GRAD_KEY = "grad_mean_abs"      # per-epoch list, one value per block (element 0: block 1), null if it never ran
STYLE = {CONSTANT_DEPTH: {"color": "tab:blue", "linestyle": "--"}, "linear": {"color": "tab:red"},
         "uniform": {"color": "tab:green"}}


def _style(g: Group) -> dict:
    return STYLE[CONSTANT_DEPTH] if g.survival is None else STYLE.get(g.survival, {})


def series(g: Group, value: Callable[[dict], float | None]) -> tuple[list[int], list[float], list[float]]:
    """Per epoch: the mean over seeds of value(record), and the sample std (0 for one seed).
    Epochs where no run has a value are left out."""
    by_epoch = defaultdict(list)
    for run in g.runs:
        for record in run.metrics():
            v = value(record)
            if v is not None and math.isfinite(v):
                by_epoch[record["epoch"]].append(float(v))
    epochs = sorted(by_epoch)
    means = [statistics.fmean(by_epoch[e]) for e in epochs]
    stds = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, means, stds


def lr_drops(g: Group) -> list[int]:
    """Epochs (1-based) that start with a lower lr than the one before: the `lr_drop` flag
    where the trainer logs it, else read off the `lr` column."""
    records = max((r.metrics() for r in g.runs), key=len)
    if records and all("lr_drop" in r for r in records):
        return [r["epoch"] for r in records if r["lr_drop"]]
    return [b["epoch"] for a, b in zip(records, records[1:]) if b["lr"] < a["lr"]]


def _curve(ax, g: Group, value: Callable[[dict], float | None]) -> bool:
    epochs, means, stds = series(g, value)
    if not epochs:
        return False
    ax.plot(epochs, means, label=f"{g.label()} (n={g.n})", **_style(g))
    if any(stds):
        ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        alpha=0.2, color=_style(g).get("color"), linewidth=0)
    return True


def _title(fig: Figure, text: str, variant: str) -> None:
    fig.suptitle(text + (f"\n({variant})" if variant else ""))


def _paper_pair(groups: list[Group]) -> list[Group]:
    """The paper's two settings in a cohort: constant depth, and linear decay to pL = 0.5."""
    constant = [g for g in groups if g.survival is None]
    stochastic = [g for g in groups if g.survival == "linear" and g.pL == 0.5]
    return constant + stochastic if constant and stochastic else []


def fig3(pair: list[Group]) -> Figure | None:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    err, loss = fig.subplots(1, 2)
    drawn = [_curve(err, g, lambda r: r.get("test_error_pct")) for g in pair]
    if not all(drawn):
        return None
    for g in pair:
        _curve(loss, g, lambda r: r.get("train_loss"))
    err.set(xlabel="epoch", ylabel="test error (%)", title="test error (mean ± std over seeds)")
    loss.set(xlabel="epoch", ylabel="training loss", title="training loss (mean ± std over seeds)")
    for ax in (err, loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    g = pair[0]
    _title(fig, f"Fig. 3: {g.dataset}, {g.depth} layers, constant vs stochastic depth", g.variant)
    return fig


def fig4_panel(group: Group) -> bool:
    """The settings of the paper's Fig. 4: SVHN (ResNet-152 there), and ResNet-1202 on CIFAR-10."""
    return group.dataset == "svhn" or (group.dataset == "cifar10" and group.depth == 1202)


def fig4(pairs: list[list[Group]]) -> Figure | None:
    """Test error against epoch, one panel per constant/stochastic pair (SVHN, ResNet-1202)."""
    pairs = [p for p in pairs if all(series(g, lambda r: r.get("test_error_pct"))[0] for g in p)]
    pairs.sort(key=lambda p: p[0].dataset != "svhn")  # the paper's order: SVHN left, ResNet-1202 right
    if not pairs:
        return None
    fig = Figure(figsize=(5.5 * len(pairs) + 0.5, 4.2), layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, pair in zip(axes, pairs):
        for g in pair:
            _curve(ax, g, lambda r: r.get("test_error_pct"))
        g = pair[0]
        ax.set(xlabel="epoch", ylabel="test error (%)",
               title=f"{g.dataset}, {g.depth} layers" + (f"\n({g.variant})" if g.variant else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Fig. 4: test error during training, constant vs stochastic depth (mean ± std over seeds)")
    return fig


def fig7(pair: list[Group]) -> Figure | None:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    first_block = lambda r: (r.get(GRAD_KEY) or [None])[0]  # noqa: E731
    drawn = [_curve(ax, g, first_block) for g in pair]
    if not any(drawn):
        return None
    for i, epoch in enumerate(lr_drops(pair[0])):
        # between the last epoch at the old lr and the first at the new one
        ax.axvline(epoch - 0.5, color="gray", linestyle=":", label="lr drop" if i == 0 else None)
    ax.set(xlabel="epoch", ylabel="mean |gradient|, first conv of block 1",
           title="mean ± std over seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    g = pair[0]
    _title(fig, f"Fig. 7: first-block gradient magnitude, {g.dataset}, {g.depth} layers", g.variant)
    return fig


def fig8_pL(groups: list[Group]) -> Figure | None:
    """Test error against pL, one line per survival rule, the constant-depth level dashed."""
    curves = defaultdict(list)
    for g in groups:
        if g.survival is not None:
            curves[g.survival].append(g)
    curves = {s: sorted(gs, key=lambda g: g.pL) for s, gs in curves.items() if len(gs) > 1}
    if not curves:
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for survival, gs in sorted(curves.items()):
        ax.errorbar([g.pL for g in gs], [g.mean(HEADLINE) for g in gs],
                    yerr=[g.std(HEADLINE) or 0.0 for g in gs], marker="o", capsize=3,
                    label=f"{survival} (n={min(g.n for g in gs)}-{max(g.n for g in gs)})"
                    if len({g.n for g in gs}) > 1 else f"{survival} (n={gs[0].n})", **STYLE.get(survival, {}))
    for g in groups:
        if g.survival is None:
            ax.axhline(g.mean(HEADLINE), label=f"{g.label()} (n={g.n})", **STYLE[CONSTANT_DEPTH])
    ax.set(xlabel="survival probability of the last block, $p_L$", ylabel="test error (%)",
           title="test error at the best-validation epoch, mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    g = groups[0]
    _title(fig, f"Fig. 8 left: test error vs $p_L$, {g.dataset}, {g.depth} layers", g.variant)
    return fig


def fig8_heatmap(groups: list[Group], survival: str, variant: str) -> Figure | None:
    """Test error over (depth, pL) for one survival rule; constant-depth runs are its pL = 1 column."""
    cells = {(g.depth, g.pL): g.mean(HEADLINE) for g in groups if g.survival in (None, survival)}
    depths = sorted({d for d, _ in cells})
    pLs = sorted({p for _, p in cells})
    if len(depths) < 2 or len(pLs) < 2:
        return None
    grid = [[cells.get((d, p), math.nan) for p in pLs] for d in depths]
    fig = Figure(figsize=(max(6.5, 1.5 + 0.75 * len(pLs)), max(3.5, 1.8 + 0.5 * len(depths))),
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="test error (%)")
    values = [v for row in grid for v in row if not math.isnan(v)]
    middle = (min(values) + max(values)) / 2
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if v < middle else "black")
    ax.set_xticks(range(len(pLs)), [f"{p:g}" for p in pLs])
    ax.set_yticks(range(len(depths)), [str(d) for d in depths])
    ax.set(xlabel="$p_L$", ylabel="depth (layers)")
    _title(fig, f"Fig. 8 right: test error over $p_L$ and depth\n{groups[0].dataset}, {survival} survival", variant)
    return fig


def make_figures(groups: list[Group]) -> tuple[dict[str, Figure], list[str]]:
    """Every figure the runs allow, by file stem, and one reason per figure that none allow."""
    figures, skipped = {}, []

    def add(stem: str, fig: Figure) -> None:
        n = 2
        unique = stem
        while unique in figures:  # same dataset and depth, another recipe
            unique, n = f"{stem}-{n}", n + 1
        figures[unique] = fig

    found = defaultdict(int)
    fig = fig4([p for p in (_paper_pair(gs) for gs in cohorts(groups).values()) if p and fig4_panel(p[0])])
    if fig is not None:
        found["fig4"] += 1
        add("fig4", fig)
    for (dataset, depth, _), gs in cohorts(groups).items():
        pair = _paper_pair(gs)
        if pair:
            fig = fig3(pair)
            if fig is not None:
                found["fig3"] += 1
                add(f"fig3_{dataset}_d{depth}", fig)
            fig = fig7(pair)
            if fig is not None:
                found["fig7"] += 1
                add(f"fig7_{dataset}_d{depth}", fig)
        fig = fig8_pL(gs)
        if fig is not None:
            found["fig8_pL"] += 1
            add(f"fig8_pL_{dataset}_d{depth}", fig)

    # The heatmap spans depths: runs of one dataset and recipe (depth aside).
    by_recipe = defaultdict(list)
    for g in groups:
        by_recipe[(g.dataset, g.recipe)].append(g)
    labels = {}
    for dataset in {d for d, _ in by_recipe}:
        labels.update({(dataset, r): v for r, v in variant_labels(r for d, r in by_recipe if d == dataset).items()})
    for (dataset, recipe), gs in by_recipe.items():
        for survival in sorted({g.survival for g in gs if g.survival}):
            fig = fig8_heatmap(gs, survival, labels[(dataset, recipe)])
            if fig is not None:
                found["fig8_heatmap"] += 1
                add(f"fig8_heatmap_{dataset}_{survival}", fig)

    reasons = {
        "fig3": "Fig. 3 skipped: needs constant-depth (pL=1) and stochastic (linear, pL=0.5) runs "
                f"of the same dataset, depth and recipe, with their {METRICS}",
        "fig4": "Fig. 4 skipped: needs constant-depth (pL=1) and stochastic (linear, pL=0.5) runs on svhn "
                f"or of depth 1202 on cifar10, with their {METRICS}",
        "fig7": f"Fig. 7 skipped: no constant/stochastic pair of runs has '{GRAD_KEY}' in its {METRICS} "
                "(per-block gradient magnitudes, from a trainer that logs them)",
        "fig8_pL": "Fig. 8 left skipped: needs runs at two or more pL < 1 with one survival rule "
                   "(same dataset, depth and recipe)",
        "fig8_heatmap": "Fig. 8 right skipped: needs runs at two or more depths and two or more pL "
                        "(same dataset, survival rule and recipe)",
    }
    skipped = [reason for name, reason in reasons.items() if not found[name]]
    return figures, skipped


def safe_stem(stem: str) -> str:
    """A figure's name as a file name: runs of characters other than letters, digits, _ . - become '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)


def main(argv: list[str]) -> int:
    parser = ArgParser(prog="sdrun plot", description=(
        "The paper's Figs. 3, 4, 7 and 8 (left and right) from finished runs below the given directories, "
        "as PNG and PDF in --out."))
    parser.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument("--out", type=Path, required=True, help="directory for the figures")
    args = parser.parse_args(argv)

    try:
        groups, notes = load_groups(args.dirs)
    except RunsError as e:
        return parser.fail(str(e), code=e.exit_code)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    figures, skipped = make_figures(groups)
    for reason in skipped:
        print(reason, file=sys.stderr)
    if not figures:
        return parser.fail("no figure can be drawn from these runs (reasons above)", code=1)
    args.out.mkdir(parents=True, exist_ok=True)
    for stem, fig in figures.items():
        for ext in ("png", "pdf"):
            path = args.out / f"{safe_stem(stem)}.{ext}"
            fig.savefig(path, dpi=150)
        print(f"wrote {args.out / safe_stem(stem)}.png and .pdf")
    return 0
