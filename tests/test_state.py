"""TrainState: a saved and restored state continues exactly like the state that never stopped.

In-process and small (ResNet-8 on the embedded digits): the end-to-end guarantee (a real
process killed with SIGKILL and resumed) is tests/test_resume.py; this pins the unit that
makes it possible, and the checkpoint format's safety checks.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from sdrun.config import OptimConfig
from sdrun.data.batches import Normalizer, TrainBatches
from sdrun.data.readers import load_digits_data
from sdrun.engine.optim import make_optimizer
from sdrun.rng import seed_global
from sdrun.engine.runtime import Runtime
from sdrun.engine.state import SavedRun, TrainState, read_checkpoint
from sdrun.model.resnet import build_model
from sdrun.model.stochastic import GateSampler
from sdrun.engine.loop import train_step
from sdrun.rundir import CheckpointError

RT = Runtime(torch.device("cpu"), precision="fp32", eval_precision="fp32", channels_last=False)


def fresh_state(seed: int = 1) -> TrainState:
    seed_global(seed)
    train, _, _ = load_digits_data(32)
    train = train.part(slice(0, 96))
    normalizer = Normalizer.fit(train.images)
    model = build_model("cifar_resnet", 8, 10, 0.5, "linear")
    batches = TrainBatches(train, normalizer, batch_size=32, translate=4, flip=True, seed=seed)
    return TrainState(model, make_optimizer(model, OmegaConf.structured(OptimConfig)),
                      GateSampler(model.survival_probs, seed), batches, normalizer)


def run_epoch(state: TrainState) -> None:
    state.model.train()
    for x, y in state.batches:
        train_step(state.model, state.optimizer, x, y, state.gates.draw(), RT)
        state.step += 1
    state.epoch += 1


def test_restored_state_continues_bit_identically(tmp_path):
    a = fresh_state()
    run_epoch(a)
    a.best, a.train_time_s, a.active_total = {"val_error_pct": 12.5, "epoch": 1}, 3.0, 7
    rng_at_save = torch.get_rng_state()
    a.save(tmp_path / "checkpoint.pt", {"seed": 1})
    b = fresh_state(seed=2)  # other init, other generators, other global RNG state
    assert not torch.equal(torch.get_rng_state(), rng_at_save)
    b.restore(SavedRun.load(tmp_path / "checkpoint.pt"))
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    assert (b.epoch, b.step, b.best, b.train_time_s, b.active_total) == (1, 3, a.best, 3.0, 7)
    # The next epoch (same gates, same batches, same augmentation, same momentum) matches.
    run_epoch(a)
    run_epoch(b)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_checkpoint_without_training_state_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an sdrun training checkpoint .missing config, epoch"):
        read_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch.save archive"):
        read_checkpoint(tmp_path / "text.pt")
