import pytest
import torch
from torch import nn

from sdrun.model.stochastic import GateSampler, StochasticResidual, expected_active_blocks, survival_probs


def test_linear_decay_matches_formula_for_resnet110():
    L, pL = 54, 0.5
    probs = survival_probs(L, pL, "linear")
    assert len(probs) == L
    for l, p in enumerate(probs, start=1):  # 1-based block index, transitions included
        assert p == pytest.approx(1 - (l / L) * (1 - pL), abs=1e-15)
    assert probs[0] == pytest.approx(1 - 0.5 / 54)
    assert probs[-1] == pytest.approx(0.5)
    assert expected_active_blocks(probs) == pytest.approx((3 * L - 1) / 4)  # 40.25


def test_uniform_and_constant_depth():
    assert survival_probs(5, 0.3, "uniform") == [0.3] * 5
    assert survival_probs(7, 1.0, "linear") == [1.0] * 7
    with pytest.raises(ValueError):
        survival_probs(5, 1.5, "linear")
    with pytest.raises(ValueError):
        survival_probs(5, 0.5, "cubic")


def test_gate_frequencies_match_survival_probabilities():
    probs = survival_probs(54, 0.5, "linear")
    sampler = GateSampler(probs, seed=7)
    draws = torch.tensor([sampler.draw() for _ in range(20000)], dtype=torch.float64)
    # Mean active depth: std of one draw's sum is ~2.9, so the mean of 20k draws has std ~0.02.
    assert draws.sum(1).mean().item() == pytest.approx(40.25, abs=0.1)
    # Per block: std of a frequency over 20k draws is at most 0.0036.
    assert torch.allclose(draws.mean(0), torch.tensor(probs, dtype=torch.float64), atol=0.02)


def test_gates_are_reproducible_and_restorable():
    probs = survival_probs(10, 0.5, "linear")
    a, b = GateSampler(probs, seed=3), GateSampler(probs, seed=3)
    assert [a.draw() for _ in range(50)] == [b.draw() for _ in range(50)]
    state = a.state_dict()
    expected = [a.draw() for _ in range(5)]
    c = GateSampler(probs, seed=999)
    c.load_state_dict(state)
    assert [c.draw() for _ in range(5)] == expected
    assert all(all(GateSampler([1.0] * 4, seed=s).draw()) for s in range(20))  # p = 1 always survives


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("scaling,train_scale,test_scale", [("paper", 1.0, 0.7), ("inverted", 1 / 0.7, 1.0)])
def test_branch_scaling_rules(scaling, train_scale, test_scale):
    torch.manual_seed(0)
    block = StochasticResidual(Branch(), nn.Identity(), survival_prob=0.7, scaling=scaling)
    x = torch.randn(3, 4)
    f = block.branch.lin(x)
    assert torch.allclose(block(x, None), torch.relu(x + test_scale * f))
    assert torch.allclose(block(x, True), torch.relu(x + train_scale * f))
    calls = block.branch.calls
    assert torch.equal(block(x, False), x)
    assert block.branch.calls == calls  # a dropped branch is never called
