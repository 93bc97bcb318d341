"""Benchmark: the lesion study with a shared test-rule prefix vs one full forward per lesion.

    .venv/bin/python scripts/bench_analyze.py [--depth 20] [--images 500] [--repeats 3]

Random weights and images (the cost does not depend on them); prints both times and their
ratio, measured in one process. Counting residual blocks run, the shared prefix costs
(L + 2) / (2L) of the naive way: 0.61 for L = 9, 0.52 for L = 54.
"""

from __future__ import annotations

import argparse
import time

import torch

from sdrun.tools.analyze import Evaluator
from sdrun.data.batches import Normalizer
from sdrun.data.readers import Split
from sdrun.model.resnet import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_model("cifar_resnet", args.depth, 10, 0.5, "linear").to(args.device).eval()
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.zeros(args.images, dtype=torch.int64))
    normalizer = Normalizer(images.float().mean(0), 64.0).to(args.device)
    ev = Evaluator(model, split, normalizer, args.batch_size)
    L = len(model.blocks)

    def naive():
        for b in range(L):
            ev.logits([None] * b + [False] + [None] * (L - b - 1))

    def shared():
        ev.lesion_logits(range(L))

    def best_time(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_naive, t_shared = best_time(naive), best_time(shared)
    print(f"lesion study, ResNet-{args.depth} (L={L}), {args.images} images on {args.device}: "
          f"one forward per lesion {t_naive:.3f}s, shared prefix {t_shared:.3f}s, "
          f"ratio {t_shared / t_naive:.2f} (block count: {(L + 2) / (2 * L):.2f})")


if __name__ == "__main__":
    main()
