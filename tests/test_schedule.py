"""The learning-rate schedule: steps at the milestones, warm-up first.

Under the paper's reading (optim.epoch_base=zero) the lr drops after m completed epochs; under
the reference code's (one, the default) one epoch earlier (tests/test_fidelity.py pins both
against the reference's rule).
"""

import pytest
from omegaconf import OmegaConf

from sdrun.engine.schedule import lr_at
from tests.conftest import compose_cfg


def test_cifar_recipe_divides_by_ten_at_250_and_375():
    epochs = [0, 1, 248, 249, 250, 251, 373, 374, 375, 499]
    paper = compose_cfg("dataset=cifar10", "fidelity=paper").optim
    assert [lr_at(e, paper) for e in epochs] == pytest.approx(
        [0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001])
    reference = compose_cfg("dataset=cifar10").optim  # epochs numbered from 1: 249 epochs at 0.1
    assert [lr_at(e, reference) for e in epochs] == pytest.approx(
        [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001])


def test_warmup_then_the_schedule():
    # ResNet-1202's recipe: lr 0.01 for the first 10 epochs, then 0.1 and the usual steps
    optim = compose_cfg("experiment=resnet1202", "fidelity=paper").optim
    assert (optim.warmup_epochs, optim.warmup_lr) == (10, 0.01)
    epochs = [0, 9, 10, optim.milestones[0] - 1, optim.milestones[0], optim.milestones[1]]
    assert [lr_at(e, optim) for e in epochs] == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.01, 0.001])


def test_gamma_and_no_milestones():
    optim = OmegaConf.create({"lr": 0.4, "gamma": 0.5, "milestones": [2, 5], "warmup_epochs": 0,
                              "warmup_lr": 0.0})
    assert [lr_at(e, optim) for e in range(7)] == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.2, 0.1, 0.1])
    optim.milestones = []
    assert {lr_at(e, optim) for e in range(100)} == {0.4}
