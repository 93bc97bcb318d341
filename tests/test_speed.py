"""Per-branch torch.compile keeps the skip, the numbers and the checkpoint format."""

import copy

import torch
import torch.nn.functional as F

from sdrun.models import build_model
from sdrun.speed import compile_branches


def test_per_branch_compile_matches_eager_and_keeps_parameter_names():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model("cifar_resnet", 14, 10, 0.5, "linear")  # L = 6: every branch shape, 2 transitions
    compiled = copy.deepcopy(eager)
    # The "eager" backend runs dynamo's capture and guards without a C++ compiler; the
    # trainer uses inductor (sdrun train compile=true).
    assert compile_branches(compiled, backend="eager") == 6
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for p in [*eager.parameters(), *compiled.parameters()]:
        p.grad = torch.zeros_like(p)  # as sdrun.train.make_optimizer does

    gates = [True, False, True, True, False, True]  # a dropped plain block and a dropped transition
    for batch in (8, 8, 5):  # the smaller last batch of an epoch
        x = torch.randn(batch, 3, 32, 32)
        y = torch.randint(0, 10, (batch,))
        losses = [F.cross_entropy(m(x, gates), y) for m in (eager, compiled)]
        for loss in losses:
            loss.backward()
        assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    # A dropped branch is never called, compiled or not: no gradient, no BN statistics update.
    dropped = compiled.blocks[1].branch
    assert all(float(p.grad.abs().sum()) == 0 for p in dropped.parameters())
    assert int(dropped[1].num_batches_tracked) == 0

    for m in (eager, compiled):
        m.eval()
    with torch.inference_mode():
        x = torch.randn(20, 3, 32, 32)
        assert torch.allclose(eager(x), compiled(x), atol=1e-5)
    from torch._dynamo.utils import counters
    assert not any("recompile" in k.lower() for k in counters["unimplemented"]), dict(counters["unimplemented"])
