"""The fidelity choices: where the paper's text and the code that produced Table 1 differ.

Each choice is one typed config key (sdrun.config); conf/fidelity/reference.yaml and
conf/fidelity/paper.yaml set them all at once (`fidelity=reference`, the default, or
`fidelity=paper`). This module lists them, says which preset a run's values match (for
results.json and the log); sdrun.model.model_for builds the network they describe.

For ImageNet both presets mean fb.resnet.torch's recipe (the paper's text says it used that
code): conf/dataset/imagenet.yaml, applied after the fidelity group, sets its values.
"""

from __future__ import annotations

from typing import Any

# key -> (the reference code's value, the paper text's value), for the CIFAR/SVHN family
# (yueatsprograms/Stochastic_Depth) and for ImageNet (facebookarchive/fb.resnet.torch).
SMALL_IMAGES = {
    "model.bn_init": ("uniform", "ones"),
    "model.shortcut_pool": ("subsample", "avg"),
    "model.conv_init": ("fan_in", "fan_in"),
    "model.fc_bias": ("default", "default"),
    "optim.epoch_base": ("one", "zero"),
    "dataset.std_rule": ("raw", "centred"),
    "dataset.normalization": ("pixel", "pixel"),
    "select_from": ("steps", "steps_and_epochs"),
}
IMAGENET = {
    "model.bn_init": ("ones", "ones"),
    "model.conv_init": ("fan_out", "fan_out"),
    "model.fc_bias": ("zero", "zero"),
    "optim.epoch_base": ("zero", "zero"),  # fb.resnet.torch: floor((epoch - 1) / 30) drops, epoch from 1
    "dataset.color_jitter": (0.4, 0.4),
    "dataset.lighting": (0.1, 0.1),
}


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node.value if hasattr(node, "value") else node


def summary(cfg: Any) -> dict:
    """{"preset": "reference" | "paper" | "both" | "mixed", "choices": {key: value}} for this
    run's dataset family; `cfg` is the run's config (DictConfig or plain dict)."""
    table = IMAGENET if _get(cfg, "dataset.name") == "imagenet" else SMALL_IMAGES
    choices = {k: _get(cfg, k) for k in table}
    ref = all(choices[k] == v[0] for k, v in table.items())
    paper = all(choices[k] == v[1] for k, v in table.items())
    preset = "both" if ref and paper else "reference" if ref else "paper" if paper else "mixed"
    return {"preset": preset, "choices": choices}

