"""speed=compile and speed=graphs against eager on a GPU: 50 training steps with the same gates,
data and optimiser, then parameters, BatchNorm statistics and eval outputs compared.
Also the fused SGD step against foreach on CUDA. Run with `pytest -m cuda`.

Settings: strict fp32 (TF32 off), cuDNN deterministic with benchmark off, so eager is
reproducible and any difference comes from the mode under test.

Tolerances (relative L2 norm over all parameters, ||fast - eager|| / ||eager||):
- graphs: 1e-6. A replay runs the very kernels eager launches, on the same data, so the
  expected difference is 0; 1e-6 leaves room for a cuDNN algorithm chosen differently at
  capture than eagerly, nothing more. num_batches_tracked must match exactly: it counts the
  branch calls that ran, the check that a dropped block replays nothing and that a capture's
  warm-up left no trace.
- compile: 1e-3. Inductor fuses BatchNorm and ReLU and reorders reductions (rounding at
  1e-7 per op), and 50 SGD steps at lr 0.1 amplify rounding; a real error (a missed
  statistics update, a wrong gradient) moves parameters by 1e-2 or more.
- fused vs foreach SGD: 1e-6 after 20 steps of random gradients (last-bit rounding of a
  contracted multiply-add per step).
- the trainer (sdrun.engine.loop) with speed=graphs vs eager: per-epoch metrics within 1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sdrun.model.resnet import build_model
from sdrun.engine.optim import make_optimizer
from sdrun.engine.speed import BranchGraphs, apply_speed
from sdrun.model.stochastic import GateSampler

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]

OPTIM = OmegaConf.create({"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4})
STEPS, BATCH, LAST_BATCH, DEPTH = 50, 64, 40, 20  # every 10th step a smaller batch, as an epoch's last


@pytest.fixture(autouse=True)
def strict_fp32_deterministic():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) = saved


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm((x - y).double()) for x, y in zip(a, b)]))
    den = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x.double()) for x in a]))
    return float(num / den)


def train_50(mode: str, autocast_bf16: bool = False):
    """50 steps of ResNet-20 (L = 9) in `mode`; returns the model and each block's run count."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("cifar_resnet", DEPTH, 10, 0.5, "linear").to(dev, memory_format=torch.channels_last)
    assert apply_speed(model, mode, dev) == mode
    opt = make_optimizer(model, OPTIM, impl="foreach")  # the same optimiser in every mode
    gates = GateSampler(model.survival_probs, seed=1)
    g = torch.Generator().manual_seed(1)
    ran = [0] * len(model.survival_probs)
    losses = []
    model.train()
    for step in range(STEPS):
        n = LAST_BATCH if step % 10 == 9 else BATCH
        x = torch.randn(n, 3, 32, 32, generator=g).to(dev, memory_format=torch.channels_last)
        y = torch.randint(0, 10, (n,), generator=g).to(dev)
        step_gates = gates.draw()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = F.cross_entropy(model(x, step_gates), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        losses.append(loss.detach().float())
        ran = [r + int(gt) for r, gt in zip(ran, step_gates)]
    torch.cuda.synchronize()
    return model, ran, torch.stack(losses).cpu()


def eval_logits(model) -> torch.Tensor:
    model.eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 3, 32, 32, generator=g).cuda().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return model(x).float()


def check_bn_counts(model, ran: list[int]) -> None:
    for block, count in zip(model.blocks, ran):
        for bn in (m for m in block.branch.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            assert int(bn.num_batches_tracked) == count  # one update per step the block ran


def check_against_eager(mode: str, tol: float):
    """50 steps in `mode` against eager (module docstring's tolerances); returns the fast model."""
    eager, ran, eager_losses = train_50("eager")
    fast, ran_fast, fast_losses = train_50(mode)
    assert ran == ran_fast and 0 < min(ran) < STEPS  # the same gates; blocks were dropped
    check_bn_counts(eager, ran)
    check_bn_counts(fast, ran)
    params = rel(list(eager.parameters()), list(fast.parameters()))
    stats = rel([b for n, b in eager.named_buffers() if "running" in n],
                [b for n, b in fast.named_buffers() if "running" in n])
    assert params <= tol and stats <= tol, (mode, params, stats)
    assert torch.allclose(eager_losses, fast_losses, rtol=10 * tol, atol=0), (eager_losses - fast_losses).abs().max()
    assert rel([eval_logits(eager)], [eval_logits(fast)]) <= 10 * tol
    return fast


def test_graphs_match_eager_over_50_steps():
    fast = check_against_eager("graphs", 1e-6)
    # Both batch shapes were captured once per branch that ran with both, nothing more.
    counts = [len(b.branch.forward.graphed) for b in fast.blocks]
    assert all(isinstance(b.branch.forward, BranchGraphs) for b in fast.blocks)
    assert max(counts) == 2 and all(c <= 2 for c in counts), counts


def test_graphs_under_bf16_autocast_train_and_stay_close():
    """Autocast's cache cannot be captured: the capture runs with it off. bf16 numbers differ
    from eager bf16 only by the cache (none: the casts are the same ops), so loosely close."""
    eager, ran, eager_losses = train_50("eager", autocast_bf16=True)
    graphed, _, graphed_losses = train_50("graphs", autocast_bf16=True)
    assert torch.isfinite(graphed_losses).all()
    check_bn_counts(graphed, ran)
    assert rel(list(eager.parameters()), list(graphed.parameters())) <= 1e-2


def test_graphed_model_uses_a_loaded_state_dict():
    """load_state_dict copies into the captured tensors, so after a resume the replayed
    graphs compute with the loaded weights and statistics: same gradients as eager."""
    graphed, ran, _ = train_50("graphs")
    state = copy.deepcopy(graphed.state_dict())
    x = torch.randn(BATCH, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,), device="cuda")
    gates = [True] * len(ran)
    graphed.train()
    F.cross_entropy(graphed(x, gates), y).backward()  # moves the statistics away from `state`
    graphed.load_state_dict(state)
    eager = build_model("cifar_resnet", DEPTH, 10, 0.5, "linear").cuda().to(memory_format=torch.channels_last)
    eager.load_state_dict(state)
    for m in (graphed, eager):
        m.train()
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        F.cross_entropy(m(x, gates), y).backward()
    assert rel([p.grad for p in eager.parameters()], [p.grad for p in graphed.parameters()]) <= 1e-6
    assert rel([b.float() for b in eager.buffers()], [b.float() for b in graphed.buffers()]) <= 1e-6


def test_fused_sgd_matches_foreach_on_cuda():
    torch.manual_seed(0)
    base = build_model("cifar_resnet", DEPTH, 10, 0.5, "linear").cuda()
    models = {impl: copy.deepcopy(base) for impl in ("foreach", "fused")}
    opts = {impl: make_optimizer(m, OPTIM, impl=impl) for impl, m in models.items()}
    g = torch.Generator(device="cuda").manual_seed(1)
    for step in range(20):
        grads = [torch.randn(p.shape, device="cuda", generator=g) * (step % 4 != 1) for p in base.parameters()]
        for impl, m in models.items():  # every 4th step a zero gradient: a dropped block's step
            for p, gr in zip(m.parameters(), grads):
                p.grad.copy_(gr)
            opts[impl].step()
    assert opts["fused"].param_groups[0]["fused"] is True
    assert rel(list(models["foreach"].parameters()), list(models["fused"].parameters())) <= 1e-6


def test_trainer_with_graphs_matches_eager(tmp_path):
    """The whole trainer path with speed=graphs (device data path, an epoch's smaller last
    batch, gradient statistics, evaluation in eval mode between epochs, checkpoints) against
    speed=eager: per-epoch losses and errors within 1e-4 relative (deterministic=true: the
    same kernels; the trainer's precision, whichever it is, is the same in both)."""
    import json

    from hydra import compose, initialize_config_module

    from sdrun.launch.compose import register_configs
    from sdrun.launch.app import train

    register_configs()
    rows = {}
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        for mode in ("eager", "graphs"):
            with initialize_config_module(config_module="sdrun.conf", version_base="1.3"):
                cfg = compose("train", overrides=["dataset=digits", "depth=20", "epochs=3", "device=cuda",
                                                  "deterministic=true", f"speed={mode}"])
            results = train(cfg, tmp_path / mode)
            assert results["speed"] == mode
            rows[mode] = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    finally:
        torch.use_deterministic_algorithms(was_deterministic)  # train() set it for the process
    for e, g in zip(rows["eager"], rows["graphs"]):
        for key in ("train_loss", "train_error_pct", "val_error_pct", "test_error_pct"):
            assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), (e["epoch"], key)


def test_compile_matches_eager_over_50_steps():
    """Its own test, named "compile", and last in the file: the acceptance run deselects cold
    inductor compiles (-k "not compile") and runs them at the end, when time is left."""
    torch._dynamo.reset()
    check_against_eager("compile", 1e-3)
