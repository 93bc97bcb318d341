"""Gradient statistics are right, not just present: computed directly in the test and compared
with what GradStats gathers and RunBoard writes into TensorBoard event files."""

import glob

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from sdrun.engine.gradstats import GradStats
from sdrun.model.resnet import CifarResNet, first_conv
from sdrun.engine.tblog import FIRST_BLOCK_TAG, MODEL_NORM_TAG, RunBoard, block_tag
from sdrun.engine.optim import make_optimizer

OPTIM = OmegaConf.create({"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4})

# ResNet-8 has L = 3 blocks. Epoch 1: every block runs at least once; epoch 2: block 3 never runs.
EPOCHS = [
    [[True, True, False], [False, True, True], [True, False, True], [True, True, True]],
    [[True, False, False], [True, True, False], [False, False, False]],
]


def read_events(run_dir) -> dict:
    """tag -> list of (step, value, description) from the run's event files, as TensorBoard reads them."""
    out = {}
    for path in sorted(glob.glob(f"{run_dir}/events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            for v in event.summary.value:
                if v.HasField("tensor") and v.metadata.plugin_data.plugin_name in ("scalars", ""):
                    value = tensor_util.make_ndarray(v.tensor).item()
                    out.setdefault(v.tag, []).append((event.step, value, v.metadata.summary_description))
    return out


def test_logged_gradients_equal_direct_computation(tmp_path):
    torch.manual_seed(0)
    model = CifarResNet(8, 10, p_last=0.5)
    optimizer = make_optimizer(model, OPTIM)
    stats = GradStats(model)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))  # one fixed batch
    writer = SummaryWriter(str(tmp_path))
    board = RunBoard(writer, num_blocks=3)
    records, expected = [], []
    for epoch, epoch_gates in enumerate(EPOCHS, start=1):
        per_block = [[] for _ in range(3)]
        norms = []
        for gates in epoch_gates:
            optimizer.zero_grad(set_to_none=False)
            F.cross_entropy(model(x, gates), y).backward()
            stats.record(gates)
            for l, ran in enumerate(gates):
                if ran:  # computed directly from the gradient the optimiser is about to use
                    per_block[l].append(first_conv(model.blocks[l]).weight.grad.abs().mean().item())
            norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
            optimizer.step()
        record = stats.end_epoch() | {"lr_drop": epoch == 2}
        board.write_epoch(record, epoch, stats)
        records.append(record)
        expected.append(([sum(v) / len(v) if v else None for v in per_block], sum(norms) / len(norms)))
    writer.close()

    (mean_abs_1, norm_1), (mean_abs_2, norm_2) = expected
    assert records[0]["grad_mean_abs"] == pytest.approx(mean_abs_1, rel=1e-5)
    assert records[1]["grad_mean_abs"][:2] == pytest.approx(mean_abs_2[:2], rel=1e-5)
    assert records[1]["grad_mean_abs"][2] is None and mean_abs_2[2] is None  # block 3 never ran
    assert records[0]["grad_norm"] == pytest.approx(norm_1, rel=1e-5)
    assert records[1]["grad_norm"] == pytest.approx(norm_2, rel=1e-5)
    assert records[0]["grad_steps"] == [3, 3, 3] and records[1]["grad_steps"] == [2, 1, 0]
    assert records[0]["active_blocks_hist"] == [0, 0, 3, 1] and records[1]["active_blocks_hist"] == [1, 1, 1, 0]

    events = read_events(tmp_path)
    first = events[FIRST_BLOCK_TAG]
    assert [s for s, _, _ in first] == [1, 2]
    assert [v for _, v, _ in first] == pytest.approx([mean_abs_1[0], mean_abs_2[0]], rel=1e-6)
    assert "averaged over the steps of the epoch in which it ran" in first[0][2]
    assert [v for _, v, _ in events[block_tag("grad", 1, 3)]] == pytest.approx([mean_abs_1[0], mean_abs_2[0]], rel=1e-6)
    # A block that never ran in an epoch gets no point rather than a fake zero; its step count does.
    assert [s for s, _, _ in events[block_tag("grad", 3, 3)]] == [1]
    assert [(s, v) for s, v, _ in events[block_tag("grad_steps", 3, 3)]] == [(1, 3.0), (2, 0.0)]
    assert [v for _, v, _ in events[MODEL_NORM_TAG]] == pytest.approx([norm_1, norm_2], rel=1e-6)
    assert [v for _, v, _ in events["lr_drop"]] == [0.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the no-sync property is about accelerators")
def test_record_never_syncs_with_the_device():
    model = CifarResNet(8, 10).cuda()
    make_optimizer(model, OPTIM)
    stats = GradStats(model)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    for gates in EPOCHS[0]:
        F.cross_entropy(model(x, gates), y).backward()
        torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
        try:
            stats.record(gates)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert stats.end_epoch()["grad_steps"] == [3, 3, 3]


def test_disabled_keeps_depth_histogram_only():
    model = CifarResNet(8, 10)
    stats = GradStats(model, enabled=False)
    stats.record([True, False, True])
    assert stats.end_epoch() == {"active_blocks_hist": [0, 0, 1, 0]}
    assert stats.steps == 0  # reset for the next epoch


def test_block_tags_sort_by_depth():
    assert block_tag("grad", 7, 54) == "grad/block_007"
    assert block_tag("grad", 1, 600) < block_tag("grad", 10, 600) < block_tag("grad", 600, 600)
    assert block_tag("grad", 1, 1500) == "grad/block_0001"

