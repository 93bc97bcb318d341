"""sdrun.report.figures on hand-written run directories: what each figure shows, not just that it exists."""

import math

import numpy as np
import pytest

from sdrun.report.figures import fig3, fig7, fig8_heatmap, fig8_pL, lr_drops, make_figures
from sdrun.report.collect import find_runs, group_runs
from tests.run_fixtures import curve, write_run


def groups_below(root):
    runs, _ = find_runs([root])
    return group_runs(runs)[0]


def constant_and_stochastic(root, grads=None, flag_drops=False, epochs=6):
    """Two seeds of each: test error curves 10+e and 12+e (constant), 8+e and 10+e (stochastic)."""
    for seed in (1, 2):
        for pL, start in ((1.0, 8.0 + 2 * seed), (0.5, 6.0 + 2 * seed)):
            g = None if grads is None else [grads[pL] * e for e in range(1, epochs + 1)]
            write_run(root / f"pL{pL}_s{seed}", pL=pL, seed=seed, error=start,
                      metrics=curve(epochs, start, 1.0, lr_drops=(3, 5), grads=g, flag_drops=flag_drops))
    return groups_below(root)


def test_fig3_shows_mean_curves_of_both_settings(tmp_path):
    groups = constant_and_stochastic(tmp_path)
    fig = fig3(groups)
    err, loss = fig.axes
    assert err.get_xlabel() == "epoch" and err.get_ylabel() == "test error (%)"
    assert loss.get_ylabel() == "training loss"
    assert [t.get_text() for t in err.get_legend().get_texts()] == \
        ["constant depth (n=2)", "stochastic linear pL=0.5 (n=2)"]
    const, stoch = err.get_lines()
    assert list(const.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(const.get_ydata()) == pytest.approx([11 + e for e in range(1, 7)])  # mean of 10+e, 12+e
    assert list(stoch.get_ydata()) == pytest.approx([9 + e for e in range(1, 7)])
    assert list(loss.get_lines()[1].get_ydata()) == pytest.approx([(9 + e) / 10 for e in range(1, 7)])
    assert len(err.collections) == 2  # the +-1 std bands
    assert "Fig. 3: cifar10, 110 layers" in fig._suptitle.get_text()


@pytest.mark.parametrize("flag_drops", [False, True])
def test_fig7_first_block_gradient_with_lr_drops(tmp_path, flag_drops):
    groups = constant_and_stochastic(tmp_path, grads={1.0: 0.01, 0.5: 0.02}, flag_drops=flag_drops)
    assert lr_drops(groups[0]) == [3, 5]
    fig = fig7(groups)
    (ax,) = fig.axes
    lines = ax.get_lines()
    curves = [line for line in lines if line.get_label() != "lr drop" and not line.get_label().startswith("_")]
    drops = [line for line in lines if line.get_linestyle() == ":"]
    assert len(curves) == 2 and len(drops) == 2
    assert [line.get_xdata()[0] for line in drops] == [2.5, 4.5]
    assert list(curves[1].get_ydata()) == pytest.approx([0.02 * e for e in range(1, 7)])
    assert "gradient" in ax.get_ylabel() and ax.get_xlabel() == "epoch"
    assert "lr drop" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_fig7_is_skipped_with_a_reason_without_gradient_logs(tmp_path):
    groups = constant_and_stochastic(tmp_path)
    assert fig7(groups) is None
    figures, skipped = make_figures(groups)
    assert list(figures) == ["fig3_cifar10_d110"]
    assert any(s.startswith("Fig. 7 skipped:") and "grad_mean_abs" in s for s in skipped)
    assert any(s.startswith("Fig. 4 skipped: needs constant-depth (pL=1) and stochastic") for s in skipped)
    assert len(skipped) == 4 and all("\n" not in s for s in skipped)


def test_fig8_left_error_vs_pL_per_rule_with_constant_level(tmp_path):
    for survival, base in (("linear", 5.0), ("uniform", 7.0)):
        for pL in (0.2, 0.5, 0.8):
            for seed in (1, 2):
                write_run(tmp_path / f"{survival}_{pL}_{seed}", pL=pL, survival=survival, seed=seed,
                          error=base + pL + seed)
    write_run(tmp_path / "const", pL=1.0, error=6.0)
    fig = fig8_pL(groups_below(tmp_path))
    (ax,) = fig.axes
    assert len(ax.containers) == 2  # one errorbar series per survival rule
    linear, uniform = ax.containers
    x, y = linear.lines[0].get_data()
    assert list(x) == [0.2, 0.5, 0.8] and list(y) == pytest.approx([6.7, 7.0, 7.3])
    assert list(uniform.lines[0].get_data()[1]) == pytest.approx([8.7, 9.0, 9.3])
    (level,) = [line for line in ax.get_lines() if line.get_label() == "constant depth (n=1)"]
    assert list(level.get_ydata()) == [6.0, 6.0]
    assert ax.get_ylabel() == "test error (%)" and "p_L" in ax.get_xlabel()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"linear (n=2)", "uniform (n=2)",
                                                                  "constant depth (n=1)"}


def test_fig8_right_heatmap_over_pL_and_depth(tmp_path):
    for depth in (20, 56):
        for pL in (0.5, 1.0):
            write_run(tmp_path / f"d{depth}_{pL}", depth=depth, num_blocks=(depth - 2) // 2, pL=pL,
                      error=depth / 10 + pL)
    write_run(tmp_path / "d110", depth=110, pL=0.5, error=3.0)  # a missing (110, 1.0) cell stays blank
    groups = groups_below(tmp_path)
    fig = fig8_heatmap(groups, "linear", "")
    ax, colorbar = fig.axes
    grid = np.asarray(ax.images[0].get_array().filled(np.nan))
    assert grid.shape == (3, 2)
    np.testing.assert_allclose(grid[:2], [[2.5, 3.0], [6.1, 6.6]])
    assert grid[2, 0] == 3.0 and math.isnan(grid[2, 1])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["20", "56", "110"]
    assert ax.get_xlabel() == "$p_L$" and ax.get_ylabel() == "depth (layers)"
    assert colorbar.get_ylabel() == "test error (%)"
    assert len(ax.texts) == 5  # every filled cell is annotated
    figures, skipped = make_figures(groups)
    assert list(figures) == ["fig8_heatmap_cifar10_linear"]
    assert any(s.startswith("Fig. 3 skipped:") and "metrics.jsonl" in s for s in skipped)  # no curves here


def test_fig4_svhn_and_resnet1202_panels(tmp_path):
    for pL, start in ((1.0, 3.0), (0.5, 2.0)):
        write_run(tmp_path / f"svhn_{pL}", dataset="svhn", depth=152, num_blocks=75, pL=pL, epochs=4, error=start,
                  metrics=curve(4, start, -0.5))
        write_run(tmp_path / f"r1202_{pL}", depth=1202, num_blocks=600, pL=pL, epochs=5, error=start + 4,
                  metrics=curve(5, start + 4, 0.25))
    write_run(tmp_path / "d110", depth=110, pL=1.0, metrics=curve(3, 9.0, 0.0))  # not a Fig. 4 setting
    figures, skipped = make_figures(groups_below(tmp_path))
    assert not any(s.startswith("Fig. 4") for s in skipped)
    svhn, r1202 = figures["fig4"].axes  # the paper's order: SVHN left, ResNet-1202 right
    assert [svhn.get_title(), r1202.get_title()] == ["svhn, 152 layers", "cifar10, 1202 layers"]
    const, stoch = r1202.get_lines()
    assert list(const.get_ydata()) == pytest.approx([7.0 + 0.25 * e for e in range(1, 6)])
    assert list(stoch.get_xdata()) == [1, 2, 3, 4, 5] and const.get_linestyle() == "--"
    assert list(svhn.get_lines()[1].get_ydata()) == pytest.approx([2.0 - 0.5 * e for e in range(1, 5)])
    assert svhn.get_ylabel() == "test error (%)" and "Fig. 4" in figures["fig4"]._suptitle.get_text()

