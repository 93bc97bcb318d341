"""The config of a run as `sdrun train OVERRIDES` composes it: the schema registered with Hydra,
and Hydra's compose API for the code that needs a run's config without launching it (sdrun
bench, the tests)."""

from __future__ import annotations

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from sdrun.config import TrainConfig


def register_configs() -> None:
    """The typed schema (sdrun.config.TrainConfig) that conf/train.yaml extends."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def compose(*overrides: str) -> DictConfig:
    """The config `sdrun train OVERRIDES` would run (no run directory, no callbacks)."""
    register_configs()
    with initialize_config_module("sdrun.conf", version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))
