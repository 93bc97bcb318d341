"""conf/experiment/ presets run the paper's experiments: each job of each preset's sweep, composed
as `sdrun train -m experiment=NAME` composes it, checked against the paper's recipe as
/work/shared/PAPER.md states it (section "Training recipes", Tables 1 and 2, Fig. 8), not
against a copy of the YAML. The learning rate is checked as the run will apply it
(sdrun.engine.schedule.lr_at), whichever epoch-numbering convention the preset uses.
"""

import copy
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sdrun import fidelity
from sdrun.config import validate
from sdrun.engine.schedule import lr_at
from sdrun.launch.compose import register_configs
from sdrun.launch.sweeps import expand_sweep
from tests.conftest import sdrun_main

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PL_GRID = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0}  # Fig. 8: p_L in {0.1, 0.2, ..., 1.0}


def compose_preset(name: str):
    register_configs()
    with initialize_config_module("sdrun.conf", version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)


def jobs(name: str) -> list:
    """Every job's config of the preset's sweep, in Hydra's job order, each validated as a run is."""
    cfg = compose_preset(name)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params or {})
    out = []
    for overrides in expand_sweep(params, []):
        job = copy.deepcopy(cfg)
        for override in overrides:
            key, value = override.split("=", 1)
            OmegaConf.update(job, key, value)  # typed: OmegaConf converts the strings as Hydra does
        validate(job)
        out.append(job)
    return out


def values(cfgs, key: str) -> set:
    return {OmegaConf.select(c, key) for c in cfgs}


def lr_schedule(cfg, *epochs: int) -> list[float]:
    """The lr of each 1-based epoch as the run applies it."""
    return [round(lr_at(e - 1, cfg.optim), 12) for e in epochs]


def assert_sgd_recipe(cfg) -> None:
    # All datasets: SGD, momentum 0.9, Nesterov, weight decay 1e-4, batch 128.
    assert (cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay, cfg.batch_size) == (0.9, True, 1e-4, 128)


def assert_cifar_plus(cfg, classes: int) -> None:
    # CIFAR-10+/100+: 45,000 train / 5,000 validation, translation by up to 4 pixels and flips.
    assert (cfg.dataset.num_classes, cfg.dataset.val_size, cfg.dataset.translate, cfg.dataset.flip) == \
        (classes, 5000, 4, True)
    assert_sgd_recipe(cfg)


def assert_constant_vs_stochastic(cfgs) -> None:
    # Table 1: constant depth (p_L = 1) against linear decay to p_L = 0.5.
    assert values(cfgs, "pL") == {1.0, 0.5} and {str(s) for s in values(cfgs, "survival")} == {"linear"}


CHECKED: list[str] = []


def checks(*names: str):
    """The presets a test checks (test_every_preset_is_checked adds them up)."""
    CHECKED.extend(names)
    return pytest.mark.parametrize("name", names)


@checks("table1_cifar10", "table1_cifar100")
def test_table1_cifar(name):
    dataset = name.removeprefix("table1_")
    classes = {"cifar10": 10, "cifar100": 100}[dataset]
    cfgs = jobs(name)
    assert_constant_vs_stochastic(cfgs)
    for cfg in cfgs:
        # ResNet-110, 500 epochs, lr 0.1 divided by 10 at epochs 250 and 375 (50 % and 75 %).
        assert (cfg.dataset.name, cfg.depth, cfg.epochs) == (dataset, 110, 500)
        assert lr_schedule(cfg, 1, 248, 251, 374, 376, 500) == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
        assert_cifar_plus(cfg, classes)
        assert fidelity.summary(cfg)["preset"] == "reference"  # the code that produced Table 1
    assert len(values(cfgs, "seed")) > 1  # Table 1's mean and std over seeds


@checks("table1_svhn")
def test_table1_svhn(name):
    cfgs = jobs(name)
    assert_constant_vs_stochastic(cfgs)
    for cfg in cfgs:
        # 152 layers, 50 epochs, lr 0.1 divided by 10 at epochs 30 and 35, no augmentation,
        # validation 400 per class from train + 200 per class from extra, checked every 200 iterations.
        assert (cfg.dataset.name, cfg.depth, cfg.epochs) == ("svhn", 152, 50)
        assert lr_schedule(cfg, 1, 28, 31, 34, 36, 50) == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
        assert (cfg.dataset.translate, cfg.dataset.flip, list(cfg.dataset.val_per_class)) == (0, False, [400, 200])
        assert cfg.eval_every_steps == 200
        assert_sgd_recipe(cfg)
        assert fidelity.summary(cfg)["preset"] == "reference"
    assert len(values(cfgs, "seed")) > 1


@checks("table1_imagenet")
def test_table1_imagenet(name):
    cfgs = jobs(name)
    assert_constant_vs_stochastic(cfgs)
    # ResNet-152 for 90 epochs, and the 120-epoch variant that Table 1 reports (lr 1e-4 from epoch 90).
    assert values(cfgs, "epochs") == {90, 120}
    for cfg in cfgs:
        assert (cfg.dataset.name, cfg.depth, cfg.model.arch) == ("imagenet", 152, "imagenet_resnet")
        # fb.resnet.torch: lr 0.1 divided by 10 every 30 epochs.
        assert lr_schedule(cfg, 1, 30, 31, 60, 61, 90, 91, 120) == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4]
        assert_sgd_recipe(cfg)
        assert fidelity.summary(cfg)["preset"] == "both"  # fb.resnet.torch's recipe under either preset


@checks("resnet1202", "resnet1202_fb")
def test_resnet1202(name):
    cfgs = jobs(name)
    assert_constant_vs_stochastic(cfgs)
    for cfg in cfgs:
        # ResNet-1202 on CIFAR-10: 300 epochs, lr 0.01 for the first 10 epochs, then 0.1,
        # divided by 10 at epochs 150 and 225.
        assert (cfg.dataset.name, cfg.depth, cfg.epochs) == ("cifar10", 1202, 300)
        assert lr_schedule(cfg, 1, 10, 11, 148, 151, 224, 226, 300) == \
            [0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
        assert_cifar_plus(cfg, 10)
    if name == "resnet1202_fb":
        # Built as fb.resnet.torch builds its networks: its ImageNet choices in sdrun.fidelity.
        for key in ("model.bn_init", "model.conv_init", "model.fc_bias"):
            assert values(cfgs, key) == {fidelity.IMAGENET[key][0]}, key


@checks("fig8_pL_sweep")
def test_fig8_pL_sweep(name):
    cfgs = jobs(name)
    # Fig. 8 left: test error against p_L, linear decay vs uniform, 110 layers, CIFAR-10.
    assert {(c.pL, str(c.survival)) for c in cfgs} == {(p, s) for p in PL_GRID for s in ("linear", "uniform")}
    for cfg in cfgs:
        assert (cfg.dataset.name, cfg.depth, cfg.epochs) == ("cifar10", 110, 500)
        assert_cifar_plus(cfg, 10)


@checks("fig8_depth_heatmap")
def test_fig8_depth_heatmap(name):
    cfgs = jobs(name)
    # Fig. 8 right: test error over p_L and network depth (CIFAR-10, linear decay).
    depths = values(cfgs, "depth")
    assert {(c.pL, c.depth) for c in cfgs} == {(p, d) for p in PL_GRID for d in depths}
    assert len(depths) > 2 and 110 in depths and all((d - 2) % 6 == 0 for d in depths)
    assert values(cfgs, "dataset.name") == {"cifar10"} and {str(s) for s in values(cfgs, "survival")} == {"linear"}
    for cfg in cfgs:
        assert_cifar_plus(cfg, 10)


@checks("smoke")
def test_smoke(name):
    # The paper's comparison shrunk to seconds: constant vs stochastic depth over two seeds, on the
    # embedded digits, a few steps with one lr drop inside the run (Fig. 7 marks it).
    cfgs = jobs(name)
    assert values(cfgs, "pL") == {1.0, 0.5} and len(values(cfgs, "seed")) == 2
    for cfg in cfgs:
        assert cfg.dataset.name == "digits" and cfg.epochs * cfg.max_steps_per_epoch <= 10
        lrs = lr_schedule(cfg, *range(1, cfg.epochs + 1))
        assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 2


def test_every_preset_is_checked():
    assert sorted(CHECKED) == PRESETS


def test_without_a_preset_nothing_is_swept():
    register_configs()
    with initialize_config_module("sdrun.conf", version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert cfg.hydra.sweeper.params is None and cfg.dataset.name == "digits"


def test_unknown_preset_is_a_one_line_error(tmp_path):
    r = sdrun_main("train", "experiment=table9", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "experiment/table9" in line and "table1_cifar10" in line
