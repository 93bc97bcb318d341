"""Plots of `sdrun analyze` results: ensemble curve, lesion curves, error vs blocks removed.

Uses matplotlib's object API (Figure, no pyplot): no display and no global state needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter


def run_label(result: dict) -> str:
    """How a run is named in the analysis report and plots."""
    if all(p == 1.0 for p in result["survival_probs"]):
        return "constant depth"
    return f"stochastic depth (pL={result['pL']:g}, {result['survival']})"


COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def _name(i: int, result: dict) -> str:
    return f"[{chr(65 + i)}] {run_label(result)}"


def _log2_axis(ax, ticks: Sequence[int]) -> None:
    """A log2 x axis labelled with the plotted integers (1, 2, 4, ...), not powers of two."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(ticks)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(MaxNLocator(nbins=1))  # no unlabelled minor ticks


def plot_ensemble(results: Sequence[dict], path: Path) -> Path:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (r, color) in enumerate(zip(results, COLORS)):
        ks = [p["k"] for p in r["ensemble"]]
        ax.plot(ks, [p["error_pct"] for p in r["ensemble"]], "o-", color=color,
                label=f"{_name(i, r)}: MC ensemble of K sub-networks")
        if r["bn_recomputed"]:
            own = r["bn_recomputed"]["ensemble"]
            ax.plot([p["k"] for p in own], [p["error_pct"] for p in own], "^:", color=color,
                    label="same sub-networks, BN statistics recomputed for each")
        ax.axhline(r["test_rule_error_pct"], color=color, ls="--", label="test-time rule (branch x p_l)")
        sub = r["subnetworks"]
        ax.axhspan(sub["error_pct_mean"] - sub["error_pct_std"], sub["error_pct_mean"] + sub["error_pct_std"],
                   color=color, alpha=0.12, label="single sub-network, mean +- std")
    _log2_axis(ax, [p["k"] for r in results for p in r["ensemble"]])
    ax.set_xlabel("K (sampled sub-networks averaged)")
    ax.set_ylabel("test error (%)")
    ax.set_title("Implicit ensemble: Monte-Carlo average vs test-time rule")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def plot_lesion(results: Sequence[dict], path: Path) -> Path:
    fig = Figure(figsize=(5.2 * len(results), 4.2), layout="constrained")
    axes = fig.subplots(1, len(results), sharey=True, squeeze=False)[0]
    for i, (ax, r, color) in enumerate(zip(axes, results, COLORS)):
        rows = r["lesion"]
        ax.plot([x["block"] for x in rows], [x["error_pct"] for x in rows], "o-", color=color, ms=4,
                label="block l alone removed")
        trans = [x for x in rows if x["transition"]]
        if trans:
            ax.plot([x["block"] for x in trans], [x["error_pct"] for x in trans], "s", color="black",
                    mfc="none", ms=8, label="transition block (downsampling)")
        ax.axhline(r["test_rule_error_pct"], color="gray", ls="--", label="nothing removed (test rule)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("removed block l")
        ax.set_title(_name(i, r), fontsize="medium")
        ax.legend(fontsize="small")
    axes[0].set_ylabel("test error (%)")
    fig.suptitle("Lesion study: one block removed at test time")
    fig.savefig(path, dpi=120)
    return path


def plot_removal(results: Sequence[dict], path: Path) -> Path:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (r, color) in enumerate(zip(results, COLORS)):
        rows = r["removal"]
        ax.errorbar([x["num_removed"] for x in rows], [x["error_pct_mean"] for x in rows],
                    yerr=[x["error_pct_std"] for x in rows], fmt="o-", color=color, capsize=3,
                    label=f"{_name(i, r)} (L={r['num_blocks']})")
        ax.axhline(r["test_rule_error_pct"], color=color, ls="--", lw=1)
    _log2_axis(ax, [x["num_removed"] for r in results for x in r["removal"]])
    ax.set_xlabel("blocks removed at random (dashed: none removed)")
    ax.set_ylabel("test error (%), mean +- std over draws")
    ax.set_title("Error vs number of blocks removed")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def plot_all(results: Sequence[dict], out: Path) -> list[Path]:
    paths = [plot_ensemble(results, out / "ensemble.png")]
    if any(r["lesion"] for r in results):
        paths.append(plot_lesion(results, out / "lesion.png"))
    if any(r["removal"] for r in results):
        paths.append(plot_removal(results, out / "removal.png"))
    return paths
