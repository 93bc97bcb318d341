"""Per-step cost of the gradient instrumentation (sdrun.engine.gradstats) on ResNet-110, batch 128.

One process, one model, one optimiser. Each repeat draws one set of stochastic-depth gates
(linear decay, pL = 0.5) and runs one training step with and one without
GradStats.record on those same gates, alternating which goes first, so drift (other
processes, thermal) hits both arms alike. Prints the medians and their ratio, and the
median time of the record() call itself as a fraction of a step (a sharper figure on a
noisy machine: on the CPU record() runs synchronously, so its wall time is its cost).

    .venv/bin/python scripts/bench_gradstats.py                  # CPU, 6 pairs (a few minutes on 2 cores)
    .venv/bin/python scripts/bench_gradstats.py --device cuda --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sdrun.engine.gradstats import GradStats
from sdrun.model.resnet import CifarResNet
from sdrun.model.stochastic import GateSampler
from sdrun.engine.optim import make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=110)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6, help="timed pairs of steps (after one warm-up pair)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pL", type=float, default=0.5)
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CifarResNet(args.depth, 10, p_last=args.pL).to(device).train()
    optimizer = make_optimizer(model, OmegaConf.create(
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}))
    stats = GradStats(model)
    gates = GateSampler(model.survival_probs, seed=0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(step_gates, instrumented: bool) -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x, step_gates), y).backward()
        t_record = 0.0
        if instrumented:
            t1 = time.perf_counter()
            stats.record(step_gates)
            t_record = time.perf_counter() - t1
        optimizer.step()
        sync()
        return time.perf_counter() - t0, t_record

    plain, instrumented, record = [], [], []
    for i in range(args.repeats + 1):
        step_gates = gates.draw()
        order = (False, True) if i % 2 == 0 else (True, False)
        times = {flag: step(step_gates, flag) for flag in order}
        if i == 0:
            continue  # warm-up: allocator, kernels, lazy init
        plain.append(times[False][0])
        instrumented.append(times[True][0])
        record.append(times[True][1])
    stats.end_epoch()  # the once-per-epoch host transfer, outside the per-step cost

    t_plain, t_instr, t_rec = (statistics.median(v) for v in (plain, instrumented, record))
    print(f"ResNet-{args.depth} (L={len(model.blocks)}), batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved pairs")
    print(f"median step without instrumentation: {t_plain * 1e3:9.2f} ms")
    print(f"median step with instrumentation:    {t_instr * 1e3:9.2f} ms")
    print(f"median GradStats.record call:        {t_rec * 1e3:9.3f} ms")
    print(f"ratio with/without (medians): {t_instr / t_plain:.4f}  "
          f"(overhead {100 * (t_instr / t_plain - 1):+.2f} %, includes machine noise)")
    print(f"record() / step: {100 * t_rec / t_plain:.3f} %  (target: at most 3 %)")


if __name__ == "__main__":
    main()
