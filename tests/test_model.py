import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sdrun.model.resnet import CifarResNet, PadShortcut, first_conv
from sdrun.engine.optim import make_optimizer


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_paper():
    assert round(n_params(CifarResNet(110, 10)) / 1e6, 2) == 1.73
    m = CifarResNet(1202, 10)
    assert len(m.blocks) == 600
    assert round(n_params(m) / 1e6, 1) == 19.4


def test_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(100, 10)


def test_layout_and_survival_indexing():
    m = CifarResNet(20, 10, p_last=0.5, rule="linear")
    assert len(m.blocks) == 9
    # Transition blocks (first of stages 2 and 3) count in the 1-based index l.
    assert isinstance(m.blocks[3].shortcut, PadShortcut) and isinstance(m.blocks[6].shortcut, PadShortcut)
    assert m.survival_probs == pytest.approx([1 - l / 9 * 0.5 for l in range(1, 10)])


def test_transition_shortcut_is_avgpool_then_zero_pad():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.allclose(out[:, :16], F.avg_pool2d(x, 2))
    assert torch.count_nonzero(out[:, 16:]) == 0
    assert torch.equal(PadShortcut(16, 32, 2, pool="subsample")(x)[:, :16], x[:, :, ::2, ::2])


def test_dropped_block_does_no_work_and_keeps_bn_stats():
    torch.manual_seed(0)
    m = CifarResNet(20, 10).train()
    k = 4
    calls = []
    m.blocks[k].branch.register_forward_hook(lambda *a: calls.append(1))
    bn_before = copy.deepcopy(m.blocks[k].branch[1].state_dict())
    gates = [True] * 9
    gates[k] = False
    m(torch.randn(4, 3, 32, 32), gates).sum().backward()
    assert calls == []
    for name, value in m.blocks[k].branch[1].state_dict().items():
        assert torch.equal(value, bn_before[name]), name
    assert all(p.grad is None for p in m.blocks[k].branch.parameters())
    assert all(p.grad is not None for p in m.blocks[k + 1].branch.parameters())
    assert m.blocks[k + 1].branch[1].num_batches_tracked.item() == 1


def test_eval_output_is_shortcut_plus_p_times_branch():
    torch.manual_seed(0)
    m = CifarResNet(20, 10, p_last=0.3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = m.stem(x)
        for block in m.blocks:
            h = torch.relu(block.shortcut(h) + block.survival_prob * block.branch(h))
        expected = m.fc(h.mean((2, 3)))
        assert torch.allclose(m(x), expected, atol=1e-5)
        # Every gate open is the unscaled network (a sub-network of the implicit ensemble).
        h = m.stem(x)
        for block in m.blocks:
            h = torch.relu(block.shortcut(h) + block.branch(h))
        assert torch.allclose(m(x, [True] * 9), m.fc(h.mean((2, 3))), atol=1e-5)


def test_dropped_block_still_gets_weight_decay_and_momentum():
    torch.manual_seed(0)
    m = CifarResNet(8, 10).train()
    optim_cfg = OmegaConf.create({"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4})
    opt = make_optimizer(m, optim_cfg)
    w = first_conv(m.blocks[1]).weight
    w0 = w.detach().clone()
    opt.zero_grad(set_to_none=False)
    F.cross_entropy(m(torch.randn(4, 3, 32, 32), [True, False, True]), torch.tensor([0, 1, 2, 3])).backward()
    assert torch.count_nonzero(w.grad) == 0  # zero, not None
    opt.step()
    # First Nesterov step with zero loss gradient: buf = wd*w, update = wd*w + 0.9*buf = 1.9*wd*w.
    assert torch.allclose(w.detach(), w0 - 0.1 * 1.9 * 1e-4 * w0, rtol=0, atol=1e-9)
    assert torch.equal(opt.state[w]["momentum_buffer"], 1e-4 * w0)
