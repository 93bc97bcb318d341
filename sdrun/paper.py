"""The paper's published facts, as data: what `sdrun table` prints beside the user's numbers,
and the recipe sizes `sdrun bench` projects its step times onto. Imports nothing, so every
layer may read it.

Source: Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016 (final version),
Tables 1 and 2 and the text around them. A figure is only shown next to runs of the setting
it was measured on: the same dataset, depth and number of epochs; "stochastic" means linear
decay to p_L = 0.5, "constant" means p_L = 1.
"""

from __future__ import annotations

# CIFAR-10+/100+ (section 4): 5,000 of the 50,000 training images are held out for validation,
# and a run trains 500 epochs on the other 45,000.
CIFAR_TRAIN_IMAGES = 50_000 - 5_000
CIFAR_EPOCHS = 500

# Table 1: test error (%) at the epoch of lowest validation error.
# (dataset, depth, epochs) -> {"constant": %, "stochastic": %}
TABLE1_TEST_ERROR_PCT = {
    ("cifar10", 110, 500): {"constant": 6.41, "stochastic": 5.25},
    # The text gives 27.22 for constant depth; one copy of the table prints 27.76.
    ("cifar100", 110, 500): {"constant": 27.22, "stochastic": 24.98},
    ("svhn", 152, 50): {"constant": 1.80, "stochastic": 1.75},
    # ImageNet, ResNet-152, top-1 validation error: the 90-epoch recipe and the 120-epoch
    # variant (lr 1e-4 from epoch 90) that Table 1 reports.
    ("imagenet", 152, 90): {"constant": 23.06, "stochastic": 23.38},
    ("imagenet", 152, 120): {"constant": 21.78, "stochastic": 21.98},
    # ResNet-1202 on CIFAR-10+ (300 epochs with a 10-epoch warm-up), from the text.
    ("cifar10", 1202, 300): {"constant": 6.67, "stochastic": 4.91},
}

# Table 2: total training time in minutes on one TITAN X (Maxwell), linear decay, p_L = 0.5.
# (dataset, depth, epochs) -> {"constant": min, "stochastic": min}
TABLE2_TRAIN_TIME_MIN = {
    ("cifar10", 110, 500): {"constant": 20 * 60 + 42, "stochastic": 15 * 60 + 7},
    ("cifar100", 110, 500): {"constant": 20 * 60 + 51, "stochastic": 15 * 60 + 20},
    ("svhn", 152, 50): {"constant": 33 * 60 + 43, "stochastic": 25 * 60 + 33},
}


def method(pL: float, survival: str) -> str | None:
    """Which of the paper's two rows a setting is: 'constant', 'stochastic' (the paper's
    default, linear decay to 0.5) or None (a setting the tables do not report)."""
    if pL == 1.0:
        return "constant"
    if pL == 0.5 and survival == "linear":
        return "stochastic"
    return None


def table1_error_pct(dataset: str, depth: int, epochs: int, pL: float, survival: str) -> float | None:
    row = method(pL, survival)
    return TABLE1_TEST_ERROR_PCT.get((dataset, depth, epochs), {}).get(row) if row else None


def table2_time_min(dataset: str, depth: int, epochs: int, pL: float, survival: str) -> float | None:
    row = method(pL, survival)
    return TABLE2_TRAIN_TIME_MIN.get((dataset, depth, epochs), {}).get(row) if row else None


def table2_time_ratio(dataset: str, depth: int, epochs: int) -> float | None:
    """Stochastic over constant training time, as published (about 0.73 to 0.76)."""
    times = TABLE2_TRAIN_TIME_MIN.get((dataset, depth, epochs))
    return times["stochastic"] / times["constant"] if times else None
