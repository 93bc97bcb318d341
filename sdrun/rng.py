"""Seeds: one run seed, independent named streams derived from it.

Each consumer of randomness (weight init, gates, data order and augmentation, the
validation split) gets its own generator so that changing one (say, survival rule)
never shifts the random numbers another one sees.
"""

from __future__ import annotations

import random

import numpy as np
import torch

_STREAMS = {"init": 0, "gates": 1, "data": 2, "split": 3, "analyze": 4, "augment": 5, "color": 6}


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for `stream`, derived from the run seed with NumPy's SeedSequence."""
    state = np.random.SeedSequence([seed, _STREAMS[stream]]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def cpu_generator(seed: int, stream: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, stream))
    return g


def seed_global(seed: int) -> None:
    """Seed the global RNGs (model initialisation and anything outside the named streams)."""
    s = derive_seed(seed, "init")
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
