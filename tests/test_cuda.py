"""The CUDA paths, on a GPU: `pytest -m cuda` (scripts/gpu_acceptance.sh runs them on the H200).

Skipped, with the reason, where CUDA is absent (CI, the dev machines). Everything runs
through the real trainer or its real components on the digits (embedded, CIFAR-shaped,
the device data path), small enough for seconds per test on one GPU.

Tolerances stated here:
- resume after an interruption with deterministic=true, precision=fp32: bit-identical
  metrics (wall-clock keys aside), results and weights, as on the CPU (tests/test_resume.py);
- per-branch torch.compile (inductor) vs eager in strict fp32, same gates, same batch:
  loss and eval logits within a relative 1e-4, every gradient within a relative L2 error of
  1e-3 (inductor fuses and reorders reductions, so equal is not expected; fp32 rounding over
  a ResNet-20 forward/backward stays orders of magnitude below these);
- host synchronisation: none at all inside the step or the device data path
  (set_sync_debug_mode("error")), and for the whole trainer the same number of syncs for 3
  and for 8 steps per epoch (so none per step).

Order: pytest runs a file top to bottom and the acceptance run may be cut short, so the
no-sync tests come first and the compile test (cold inductor compiles; every compile test
has "compile" in its name, for -k "not compile") last.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

# cuBLAS is deterministic only with a fixed workspace, read when its handle is created: set it
# at collection, before any test of this process touches cuBLAS.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# tests/ is a regular package (tests/__init__.py), so this is our conftest even where a
# wheel put a package named `tests` into site-packages.
from tests.conftest import compose_cfg, read_jsonl  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")]

# ResNet-20 (L = 9 blocks) on the digits; pL 0.5 so that steps drop blocks.
RUN = ["dataset=digits", "depth=20", "pL=0.5", "epochs=2", "optim.milestones=[]", "max_steps_per_epoch=4", "batch_size=32",
       "eval_batch_size=512", "device=cuda", "progress=off"]


def train_run(run_dir: Path, *overrides: str) -> dict:
    from sdrun.launch.app import train
    return train(compose_cfg(*RUN, *overrides), run_dir)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_step_and_gradient_statistics_never_sync_the_host(precision):
    """The trainer's step body (sdrun.launch.app.train) with its device-side bookkeeping, under
    torch.cuda.set_sync_debug_mode("error"): any synchronising call raises."""
    from omegaconf import OmegaConf

    from sdrun.config import Toggle
    from sdrun.engine.gradstats import GradStats
    from sdrun.model.resnet import build_model
    from sdrun.engine.runtime import autocast, resolve_runtime
    from sdrun.model.stochastic import GateSampler
    from sdrun.engine.optim import make_optimizer

    rt = resolve_runtime(OmegaConf.create({"device": "cuda", "precision": precision, "eval_precision": "same",
                                           "channels_last": Toggle.auto, "deterministic": False}))
    model = build_model("cifar_resnet", 20, 10, 0.5, "linear").to(rt.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, OmegaConf.create({"lr": 0.1, "momentum": 0.9, "nesterov": True,
                                                        "weight_decay": 1e-4}))
    gates, stats = GateSampler(model.survival_probs, 1), GradStats(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=g).to(rt.device, memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), generator=g).to(rt.device)
    loss_sum = torch.zeros((), device=rt.device)
    wrong = torch.zeros((), dtype=torch.int64, device=rt.device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=rt.device)

    def step(i: int, all_blocks: bool = False) -> None:
        nonlocal first_bad
        step_gates = [True] * len(model.survival_probs) if all_blocks else gates.draw()
        with autocast(rt):
            out = model(x, step_gates)
            loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        stats.record(step_gates)
        optimizer.step()
        loss = loss.detach().float()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad)
        loss_sum.add_(loss * len(y))
        wrong.add_((out.detach().argmax(1) != y).sum())

    model.train()
    for i in range(3):  # warm-up, every block (every conv shape): cudnn.benchmark's search, lazy inits
        step(i, all_blocks=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3, 11):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    epoch = stats.end_epoch()  # the epoch's one read-back, outside the checked region
    assert sum(n for n in epoch["grad_steps"]) > 0 and math.isfinite(epoch["grad_norm"])
    assert int(first_bad) == -1 and math.isfinite(float(loss_sum))


def test_device_data_path_never_syncs():
    """sdrun.data.batches.TrainBatches, the CIFAR/SVHN/digits path (uint8 split resident on the GPU,
    translation, flips, channels_last), after a warm-up epoch, under
    torch.cuda.set_sync_debug_mode("error"): any synchronising call while drawing, copying
    or augmenting a batch raises. A copy to the GPU from pageable host memory is one: it
    waits for the GPU's queue to drain, so the CPU could not run ahead of the GPU."""
    from sdrun.data.batches import Normalizer, TrainBatches
    from sdrun.data.readers import Split

    g = torch.Generator().manual_seed(0)
    n = 144  # batch 32: 4 full steps and a smaller last one of 16
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    split = Split(images, torch.randint(0, 10, (n,), generator=g)).to(torch.device("cuda"))
    batches = TrainBatches(split, Normalizer.fit(images).to(split.images.device), 32, translate=4, flip=True,
                           seed=0, channels_last=True)
    pixel_sum = torch.zeros((), device="cuda")
    labels_seen = torch.zeros((), dtype=torch.int64, device="cuda")

    def epoch() -> list[tuple]:
        layout = []
        for x, y in batches:
            # Shape, layout and device are host-side metadata (no sync); the sums consume the
            # batch on the GPU, as a training step would, without reading anything back.
            layout.append((tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last), x.device.type))
            pixel_sum.add_(x.sum())
            labels_seen.add_((y >= 0).sum())
        return layout

    epoch()  # warm-up: lazy CUDA initialisation, the caching allocators, first kernel loads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layout = epoch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layout == [((32, 3, 32, 32), True, "cuda")] * 4 + [((16, 3, 32, 32), True, "cuda")]
    assert int(labels_seen) == 2 * n and bool(torch.isfinite(pixel_sum))


def test_the_whole_trainer_has_no_per_step_sync(tmp_path):
    """sync debug mode "warn" over whole runs: the syncs of epoch ends (evaluation, metrics,
    checkpoint) are allowed; the count must not grow with the steps per epoch."""
    # One-time syncs (lazy inits, cudnn.benchmark's search of every conv shape: pL=1.0 runs
    # every block) happen here, not in the runs compared.
    train_run(tmp_path / "warm-up", "epochs=1", "pL=1.0", "precision=tf32")
    counts = {}
    for steps in (3, 8):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_run(tmp_path / f"s{steps}", f"max_steps_per_epoch={steps}", "precision=tf32")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[steps] = sum("synchroniz" in str(w.message).lower() for w in caught)
    assert counts[3] == counts[8], f"host syncs by steps per epoch: {counts}"


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_short_training_on_the_device_data_path_ends_finite(tmp_path, precision):
    results = train_run(tmp_path / "run", f"precision={precision}")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(r["train_loss"]) for r in rows)
    assert all(math.isfinite(r["test_error_pct"]) and r["grad_norm"] > 0 for r in rows)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["precision"] == on_disk["eval_precision"] == precision
    assert on_disk["config"]["dataset"]["loader"] == "device"
    tf32 = precision != "fp32"
    assert on_disk["fp32_math"] == {"cudnn_allow_tf32": tf32, "matmul_allow_tf32": tf32}
    hw = on_disk["hardware"]
    assert hw["type"] == "cuda" and hw["name"] == torch.cuda.get_device_name() and hw["count"] >= 1
    assert hw["cudnn"] == torch.backends.cudnn.version()
    assert results["device"].startswith("cuda")


def test_evaluation_precision_can_differ_from_training(tmp_path):
    train_run(tmp_path / "run", "precision=bf16", "eval_precision=fp32", "epochs=1")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (on_disk["precision"], on_disk["eval_precision"]) == ("bf16", "fp32")
    # Training's math flags are back after each evaluation in fp32.
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    import sdrun.files
    import sdrun.engine.state
    # Here, not at the top: a wheel older than the shared definition then fails this test
    # alone, not the collection of the whole file.
    from sdrun.rundir import WALL_CLOCK_KEYS
    from sdrun.engine.loop import Interrupted

    settings = ["precision=fp32", "deterministic=true", "epochs=3"]
    train_run(tmp_path / "whole", *settings)

    # SIGTERM (what a scheduler's preemption sends) right after the first checkpoint write.
    real_save, writes = sdrun.engine.state.save_checkpoint, [0]

    def save_then_term(path, state):
        real_save(path, state)
        writes[0] += 1
        if writes[0] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sdrun.engine.state, "save_checkpoint", save_then_term)
    with pytest.raises(Interrupted, match="after epoch 1"):
        train_run(tmp_path / "cut", *settings)
    monkeypatch.setattr(sdrun.engine.state, "save_checkpoint", real_save)
    assert not (tmp_path / "cut" / "results.json").exists()
    train_run(tmp_path / "cut", *settings)  # the same command again resumes

    def outcome(d: Path):
        rows = [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in read_jsonl(d / "metrics.jsonl")]
        res = {k: v for k, v in json.loads((d / "results.json").read_text()).items() if k not in WALL_CLOCK_KEYS}
        weights = sdrun.engine.state.load_checkpoint(d / "checkpoint.pt")["model"]
        return rows, res, weights

    (rows_a, res_a, w_a), (rows_b, res_b, w_b) = outcome(tmp_path / "whole"), outcome(tmp_path / "cut")
    assert rows_a == rows_b
    assert res_a == res_b
    for k in w_a:
        assert torch.equal(w_a[k], w_b[k]), k


def test_torchrun_one_nccl_process_completes(tmp_path):
    """One process under torchrun on the GPU: the NCCL process group, DDP around the model and
    the trainer's distributed bookkeeping (sharded batches and evaluation, rank agreement,
    rank 0's writes) complete a run. This does not exercise SyncBatchNorm: sync_bn=true does
    convert the BatchNorm layers (sdrun.engine.distributed.wrap: a torchrun process is distributed
    even alone), but at world size 1 torch's SyncBatchNorm.forward falls back to plain
    batch_norm (need_sync = world_size > 1), so no statistic crosses processes; that needs 2
    GPUs. sync_bn=true stays on the command line only so that the conversion runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR")}
    # NCCL prints "NCCL version ..." when it creates its first communicator: the proof that
    # the collectives (DDP's broadcast and all-reduce) went through NCCL, not gloo.
    env.update(PYTHONUNBUFFERED="1", NCCL_DEBUG="VERSION")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "sdrun", "train", *RUN, "sync_bn=true", "hydra.run.dir=run"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "NCCL version" in r.stdout + r.stderr, "no NCCL communicator was created:\n" + r.stdout[-3000:]
    assert "distributed: 1 processes" in (tmp_path / "run" / "train.log").read_text()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and results["world_size"] == 1 and results["device"].startswith("cuda")
    assert all(math.isfinite(r["train_loss"]) for r in read_jsonl(tmp_path / "run" / "metrics.jsonl"))


def test_per_branch_compile_matches_eager(tmp_path):
    """Inductor-compiled branches vs eager, strict fp32, same gates (drops included)."""
    from sdrun.model.resnet import build_model
    from sdrun.engine.runtime import set_fp32_math
    from sdrun.engine.speed import compile_branches

    set_fp32_math("fp32")
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model("cifar_resnet", 20, 10, 0.5, "linear").cuda()
    compiled = copy.deepcopy(eager)
    assert compile_branches(compiled) == 9
    for p in [*eager.parameters(), *compiled.parameters()]:
        p.grad = torch.zeros_like(p)
    gates = [True, False, True, True, True, False, True, False, True]  # drops in all three stages

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    # One batch size: each new one compiles its own static graphs (tests/test_speed.py counts
    # them on the CPU), 10-15 s of inductor each here.
    for batch in (32, 32):
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        y = torch.randint(0, 10, (batch,), device="cuda")
        for m in (eager, compiled):
            m.zero_grad(set_to_none=False)
        losses = [F.cross_entropy(m(x, gates), y) for m in (eager, compiled)]
        for loss in losses:
            loss.backward()
        assert rel(losses[1], losses[0]) < 1e-4
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.grad.abs().sum() > 0:
                assert rel(q.grad, p.grad) < 1e-3, name
            else:  # a dropped branch: no gradient in either
                assert q.grad.abs().sum() == 0, name
    for m in (eager, compiled):
        m.eval()
    with torch.inference_mode():
        x = torch.randn(64, 3, 32, 32, device="cuda")
        assert rel(compiled(x), eager(x)) < 1e-4
