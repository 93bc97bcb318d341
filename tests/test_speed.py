"""speed=: per-branch torch.compile keeps the skip, the numbers and the checkpoint format; the
switch resolves and refuses on the CPU. The CUDA side (graphs, 50-step comparisons) is
tests/test_cuda_speed.py (-m cuda)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sdrun.model.resnet import build_model
from sdrun.engine.speed import compile_branches


def symbolic_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """The graph's inputs with a symbolic size (or that are one): what dynamic shapes leave."""
    def symbolic(v) -> bool:
        return isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor)
                                               and any(isinstance(d, torch.SymInt) for d in v.shape))
    return [n.name for n in gm.graph.nodes if n.op == "placeholder" and symbolic(n.meta.get("example_value"))]


def test_per_branch_compile_matches_eager_with_static_shapes_and_keeps_parameter_names():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    torch.manual_seed(0)
    eager = build_model("cifar_resnet", 14, 10, 0.5, "linear")  # L = 6: every branch shape, 2 transitions
    compiled = copy.deepcopy(eager)
    graphs = []

    def eager_backend(gm, example_inputs):
        # dynamo's capture and guards (where static or dynamic shapes are decided) without a
        # C++ compiler, keeping every captured graph; the trainer uses inductor (speed=compile).
        graphs.append(gm)
        return gm.forward

    assert compile_branches(compiled, backend=eager_backend) == 6
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for p in [*eager.parameters(), *compiled.parameters()]:
        p.grad = torch.zeros_like(p)  # as sdrun.engine.optim.make_optimizer does

    gates = [True, False, True, True, False, True]  # a dropped plain block and a dropped transition
    # Three training batch sizes (a full batch, an epoch's smaller last batch, a torchrun
    # rank's slice): with dynamo's default automatic dynamic shapes every graph from the
    # third branch kind on would have a symbolic height and width, and batch once it changed.
    for batch in (8, 8, 5, 3):
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
    assert [symbolic_inputs(gm) for gm in graphs if symbolic_inputs(gm)] == []
    # One static graph per branch kind and input shape, the count sdrun.engine.speed.RECOMPILE_LIMIT
    # is sized by: training ran 4 kinds (the stage-3 transition is dropped) at 3 batch sizes,
    # evaluation all 5 (each stage's plain block, 2 transitions; the two stage-1 blocks share
    # one) at 1; and no shape fell back to eager at the limit.
    assert len(graphs) == 4 * 3 + 5
    assert not any("recompile" in k.lower() for k in counters["unimplemented"]), dict(counters["unimplemented"])


# ---------------------------------------------------------------- the speed= switch (CPU side)

def test_speed_modes_resolve_and_refuse_what_cannot_run_here():
    from sdrun.config import ConfigError
    from sdrun.engine.speed import resolve_speed

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_speed("auto", cpu) == resolve_speed("auto", cuda) == "eager"  # until a GPU measures
    assert resolve_speed("compile", cpu) == "compile" and resolve_speed("graphs", cuda) == "graphs"
    with pytest.raises(ConfigError, match="speed=graphs needs a CUDA device"):
        resolve_speed("graphs", cpu)
    with pytest.raises(ConfigError, match="one process"):
        resolve_speed("graphs", cuda, world_size=2)
    with pytest.raises(ValueError):
        resolve_speed("warp", cpu)


def test_graphed_branches_keep_names_and_run_eagerly_off_cuda():
    """graph_branches only replaces each branch's forward: same parameter and buffer names,
    and on CPU tensors (or in eval mode) the very same eager computation."""
    from sdrun.engine.speed import BranchGraphs, graph_branches

    torch.manual_seed(0)
    eager = build_model("cifar_resnet", 14, 10, 0.5, "linear")
    graphed = copy.deepcopy(eager)
    assert graph_branches(graphed) == 6
    assert all(isinstance(b.branch.forward, BranchGraphs) for b in graphed.blocks)
    assert list(graphed.state_dict()) == list(eager.state_dict())
    gates = [True, False, True, True, False, True]
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(eager(x, gates), graphed(x, gates))
    assert all(not b.branch.forward.graphed for b in graphed.blocks)  # nothing captured off CUDA
    for m in (eager, graphed):
        m.eval()
    assert torch.equal(eager(x), graphed(x))


def test_speed_graphs_on_the_cpu_is_one_clear_line(tmp_path):
    from tests.conftest import TINY, sdrun_main  # the CLI's main() in process: a range check needs no process

    r = sdrun_main("train", *TINY, "device=cpu", "speed=graphs", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "speed=graphs needs a CUDA device" in r.stderr
