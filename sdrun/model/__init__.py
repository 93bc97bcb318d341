"""The networks: stochastic depth (stochastic.py) and the ResNets that use it (resnet.py). Imports torch only."""

from sdrun.model.resnet import build_model, model_for
from sdrun.model.stochastic import GateSampler, expected_active_blocks

__all__ = ["GateSampler", "build_model", "expected_active_blocks", "model_for"]
