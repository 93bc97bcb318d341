"""conf/experiment/ presets compose on top of the dataset recipes and pass validation."""

import copy
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sdrun.config import validate
from sdrun.launch.compose import register_configs
from tests.conftest import sdrun_main

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_preset(name: str, *overrides: str):
    register_configs()
    with initialize_config_module("sdrun.conf", version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides], return_hydra_config=True)


# The reference code's choices (conf/fidelity/reference.yaml): what the Table 1 presets must run.
REFERENCE = {"model.bn_init": "uniform", "model.shortcut_pool": "subsample", "optim.epoch_base": "one",
             "dataset.std_rule": "raw", "select_from": "steps"}

# (preset, expected values after composition, expected sweep)
EXPECTED = [
    pytest.param("table1_cifar10", {"dataset.name": "cifar10", "depth": 110, "epochs": 500, "survival": "linear",
                                    **REFERENCE},
                 {"pL": "1.0,0.5", "seed": "1,2,3"}, id="table1_cifar10"),
    pytest.param("table1_cifar100", {"dataset.name": "cifar100", "depth": 110, "epochs": 500, **REFERENCE},
                 {"pL": "1.0,0.5", "seed": "1,2,3"}, id="table1_cifar100"),
    pytest.param("table1_svhn", {"dataset.name": "svhn", "depth": 152, "epochs": 50, "optim.milestones": [30, 35],
                                 **REFERENCE},
                 {"pL": "1.0,0.5", "seed": "1,2,3"}, id="table1_svhn"),
    # ImageNet's reference is fb.resnet.torch (conf/dataset/imagenet.yaml)
    pytest.param("table1_imagenet", {"dataset.name": "imagenet", "depth": 152, "optim.milestones": [30, 60, 90],
                                     "model.bn_init": "ones", "model.conv_init": "fan_out", "model.fc_bias": "zero",
                                     "optim.epoch_base": "zero", "dataset.color_jitter": 0.4,
                                     "dataset.lighting": 0.1},
                 {"pL": "1.0,0.5", "epochs": "90,120"}, id="table1_imagenet"),
    # depth and schedule override the cifar10 recipe (110 layers, 500 epochs): presets come last
    pytest.param("resnet1202", {"dataset.name": "cifar10", "depth": 1202, "epochs": 300,
                                "optim.milestones": [150, 225], "optim.warmup_epochs": 10, "optim.warmup_lr": 0.01},
                 {"pL": "1.0,0.5"}, id="resnet1202"),
    # fb.resnet.torch-style ResNet-1202: its init, shortcuts and per-channel normalisation, the paper's schedule
    pytest.param("resnet1202_fb", {"dataset.name": "cifar10", "depth": 1202, "epochs": 300,
                                   "optim.milestones": [150, 225], "optim.warmup_epochs": 10,
                                   "model.bn_init": "ones", "model.conv_init": "fan_out", "model.fc_bias": "zero",
                                   "model.shortcut_pool": "subsample", "dataset.normalization": "channel"},
                 {"pL": "1.0,0.5"}, id="resnet1202_fb"),
    pytest.param("fig8_pL_sweep", {"dataset.name": "cifar10", "depth": 110},
                 {"pL": ",".join(f"{i / 10:g}" for i in range(1, 10)) + ",1.0", "survival": "linear,uniform"},
                 id="fig8_pL_sweep"),
    pytest.param("fig8_depth_heatmap", {"dataset.name": "cifar10", "survival": "linear"},
                 {"pL": ",".join(f"{i / 10:g}" for i in range(1, 10)) + ",1.0", "depth": "20,32,44,56,110"},
                 id="fig8_depth_heatmap"),
    pytest.param("smoke", {"dataset.name": "digits", "depth": 8, "epochs": 3, "max_steps_per_epoch": 2},
                 {"pL": "1.0,0.5", "seed": "1,2"}, id="smoke"),
]


def test_every_preset_is_covered():
    assert sorted(p.id for p in EXPECTED) == PRESETS


@pytest.mark.parametrize("name,values,sweep", EXPECTED)
def test_preset_composes(name, values, sweep):
    cfg = compose_preset(name)
    validate(cfg)
    for key, value in values.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert (list(node) if key == "optim.milestones" else node) == value, key
    assert dict(cfg.hydra.sweeper.params) == sweep
    # every value the sweep will set is a valid config too (typed: OmegaConf converts the strings)
    for key, values in sweep.items():
        for value in values.split(","):
            job = copy.deepcopy(cfg)
            OmegaConf.update(job, key, value)
            validate(job)


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
