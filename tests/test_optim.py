"""The foreach SGD step is today's update bit for bit, the fused one to the last bit; dropped
blocks included.

Tolerance for fused on the CPU: 4 float32 ulps of each value's magnitude (rtol 5e-7) after 6
steps. Its vectorised kernel rounds some elements differently (1 ulp seen in a momentum
buffer); an ulp per step, compounded by momentum 0.9, stays well under 4 ulps in 6 steps,
while any real difference in the update (a missing weight decay, dampening, Nesterov term)
is orders of magnitude larger.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sdrun.model.resnet import CifarResNet, first_conv
from sdrun.engine.optim import fused_supported, make_optimizer, resolve_impl

OPTIM = OmegaConf.create({"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4})


def train_steps(impl: str, model, steps):
    opt = make_optimizer(model, OPTIM, impl=impl)
    for i, (x, y, gates) in enumerate(steps):
        if i == 3:  # an lr change, as at a milestone
            for group in opt.param_groups:
                group["lr"] = 0.01
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x, gates), y).backward()
        opt.step()
    return opt


def test_fused_and_foreach_equal_the_loop_bit_for_bit_with_dropped_blocks():
    torch.manual_seed(0)
    base = CifarResNet(8, 10).train()
    g = torch.Generator().manual_seed(1)
    # Block 2 is dropped in steps 1-4 (zero gradient: its change is weight decay + momentum
    # only), block 3 in step 2, a smaller last batch at the end.
    gates = [[True, True, True], [True, False, True], [True, False, False], [True, False, True],
             [True, False, True], [True, True, True]]
    steps = [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), gt)
             for n, gt in zip([8, 8, 8, 8, 8, 5], gates)]
    models = {impl: copy.deepcopy(base) for impl in ("loop", "foreach", "fused")}
    opts = {impl: train_steps(impl, m, steps) for impl, m in models.items()}
    assert opts["fused"].param_groups[0]["fused"] and opts["foreach"].param_groups[0]["foreach"]
    dropped = first_conv(models["loop"].blocks[1]).weight
    assert not torch.equal(dropped, first_conv(base.blocks[1]).weight)  # weight decay reached it
    for impl, rtol in (("foreach", 0.0), ("fused", 5e-7)):
        for (name, p), q in zip(models["loop"].named_parameters(), models[impl].parameters()):
            buffers = opts["loop"].state[p]["momentum_buffer"], opts[impl].state[q]["momentum_buffer"]
            for a, b in ((p, q), buffers):  # rtol 0, atol 0: exactly equal
                assert torch.allclose(a, b, rtol=rtol, atol=0), (impl, name)
        for (name, b), c in zip(models["loop"].named_buffers(), models[impl].buffers()):
            assert torch.equal(b, c), (impl, name)  # the forward passes saw identical weights


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_first_step_of_a_dropped_block_is_weight_decay_plus_momentum(impl):
    torch.manual_seed(0)
    m = CifarResNet(8, 10).train()
    opt = make_optimizer(m, OPTIM, impl=impl)
    w = first_conv(m.blocks[1]).weight
    w0 = w.detach().clone()
    opt.zero_grad(set_to_none=False)
    F.cross_entropy(m(torch.randn(4, 3, 32, 32), [True, False, True]), torch.tensor([0, 1, 2, 3])).backward()
    assert torch.count_nonzero(w.grad) == 0
    opt.step()
    # First Nesterov step with zero loss gradient: buf = wd*w, update = wd*w + 0.9*buf = 1.9*wd*w.
    assert torch.allclose(w.detach(), w0 - 0.1 * 1.9 * 1e-4 * w0, rtol=0, atol=1e-9)
    assert torch.equal(opt.state[w]["momentum_buffer"], 1e-4 * w0)


def test_a_checkpoint_of_another_implementation_keeps_this_ones_kernels():
    torch.manual_seed(0)
    m = CifarResNet(8, 10)
    old = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    state = old.state_dict()
    assert state["param_groups"][0]["fused"] is None  # what checkpoints before sdrun.engine.optim hold
    opt = make_optimizer(m, OPTIM, impl="fused")
    opt.load_state_dict(state)
    assert opt.param_groups[0]["fused"] is True and opt.param_groups[0]["foreach"] is False
    assert len(opt.state) == len(list(m.parameters()))  # the momentum buffers came back


def test_auto_is_foreach_on_the_cpu_and_fused_on_cuda():
    assert resolve_impl("auto", torch.device("cpu")) == "foreach"  # bit-identical to the loop
    assert resolve_impl("auto", torch.device("cuda")) == ("fused" if fused_supported(torch.device("cuda"))
                                                          else "foreach")
    assert resolve_impl("loop", torch.device("cpu")) == "loop"
    with pytest.raises(ValueError):
        resolve_impl("turbo", torch.device("cpu"))
