"""`sdrun bench --concurrent 1,2,4,8`: aggregate training throughput of K processes on one device.

A launch-bound job (ResNet-110 on 32x32 images: ~800 small kernels per step) leaves most of
a large GPU idle, so several jobs of a sweep can share it (hydra/launcher=parallel
hydra.launcher.jobs_per_gpu=K). This measures what sharing buys: for each K, K real
processes each build the run of the bench's config (sdrun.tools.stepper.Stepper:
sdrun.engine.setup.build_run, as `sdrun train` builds it; process i with seed + i, as a
sweep's jobs differ) and train its steps on its own batches, warm up (cuDNN autotuning,
compile/graph captures), wait at a barrier, then all train for the same wall-clock window.
Each reports the images it trained and the seconds it took (device-synchronised); the
aggregate is the sum of their rates.

Processes: `spawn` on CUDA (a forked child cannot use CUDA), `fork` on the CPU (a quick
smoke run: the child inherits the imported modules). Each gets cores / K torch threads, as
a parallel sweep's job does.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from sdrun.paper import CIFAR_EPOCHS, CIFAR_TRAIN_IMAGES

TABLE1_RUNS = 6  # Table 1, CIFAR-10: the paper's runs per dataset


class ConcurrentFailure(RuntimeError):
    """A process of a concurrent measurement failed; the message names K and the error."""


def _worker(settings: dict, cfg, barrier, results, index: int) -> None:
    import torch

    from sdrun.engine.runtime import synchronize
    from sdrun.tools.stepper import Stepper

    try:
        torch.set_num_threads(settings["threads"])
        cfg.seed += index  # this process's copy of the config
        stepper = Stepper(cfg)
        rt = stepper.rt
        stepper.steps(settings["warmup"])
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)
        barrier.wait(timeout=settings["barrier_timeout_s"])
        synchronize(rt.device)
        t0 = time.perf_counter()
        steps = 0
        while time.perf_counter() - t0 < settings["window_s"]:
            stepper.steps(settings["chunk"])  # synchronises at its end: the time is device time
            steps += settings["chunk"]
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(rt.device) if rt.device.type == "cuda" else None
        results.put({"index": index, "steps": steps, "images": steps * stepper.batch_size,
                     "seconds": elapsed, "images_per_s": steps * stepper.batch_size / elapsed,
                     "peak_memory_bytes": peak})
    except BaseException as e:  # the parent reports it; a broken barrier releases the others
        barrier.abort()
        results.put({"index": index, "error": f"{type(e).__name__}: {e}"})


def measure(k: int, settings: dict, cfg, device_type: str) -> dict:
    """K processes training the run `cfg` describes (a composed config, checked by the caller)."""
    ctx = multiprocessing.get_context("spawn" if device_type == "cuda" else "fork")
    if device_type != "cuda":
        import sdrun.tools.stepper  # noqa: F401 (imported once here, inherited by the forked processes)
    barrier = ctx.Barrier(k)
    results = ctx.Queue()
    per = dict(settings, threads=max(1, settings["cores"] // k))
    procs = [ctx.Process(target=_worker, args=(per, cfg, barrier, results, i), daemon=True) for i in range(k)]
    for p in procs:
        p.start()
    got = []
    deadline = time.monotonic() + settings["barrier_timeout_s"] + settings["window_s"] * 4 + 60
    while len(got) < k and time.monotonic() < deadline:
        try:
            got.append(results.get(timeout=1.0))
        except Exception:  # queue.Empty: check whether the workers are still alive
            if not any(p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    errors = [r["error"] for r in got if "error" in r]
    if errors or len(got) < k:
        raise ConcurrentFailure(f"concurrent K={k}: " + ("; ".join(e.splitlines()[0] for e in errors)
                                                        or f"only {len(got)} of {k} processes reported"))
    got.sort(key=lambda r: r["index"])
    aggregate = sum(r["images_per_s"] for r in got)
    return {"k": k, "processes": got, "aggregate_images_per_s": aggregate,
            "threads_per_process": per["threads"],
            # Table 1's 6 CIFAR-10 runs of 500 epochs, K at a time at this aggregate rate.
            "table1_cifar10_6_runs_h": TABLE1_RUNS * CIFAR_EPOCHS * CIFAR_TRAIN_IMAGES / aggregate / 3600,
            "projected_500_epochs_one_run_h": CIFAR_EPOCHS * CIFAR_TRAIN_IMAGES / (aggregate / k) / 3600}


def run_concurrent(ks: list[int], a, cfg, run: dict, device_type: str, out: dict, after_each=None) -> dict:
    """One measurement per K, in order, into `out`; speed-up of the aggregate over K = 1 when measured.
    cfg: the processes' composed config; run: what the report says of it (its overrides,
    depth, pL, batch_size, speed). after_each(): called after each K (sdrun bench saves its
    report there)."""
    # The host threads the K processes share: --threads if given, else every core of this process.
    cores = a.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    settings = {**run, "warmup": a.warmup + (a.compile_warmup if a.concurrent_speed != "eager" else 0),
                "window_s": a.window, "chunk": a.chunk, "barrier_timeout_s": a.barrier_timeout, "cores": cores}
    out.update(settings=settings, runs={})
    for k in ks:
        r = out["runs"][str(k)] = measure(k, settings, cfg, device_type)
        base = out["runs"].get("1")
        if base:
            r["speedup_over_one"] = r["aggregate_images_per_s"] / base["aggregate_images_per_s"]
        out["best_k"] = max(out["runs"].values(), key=lambda m: m["aggregate_images_per_s"])["k"]
        if after_each:
            after_each()
        each = ", ".join(f"{p['images_per_s']:.0f}" for p in r["processes"])
        print(f"concurrent K={k}: {r['aggregate_images_per_s']:.0f} img/s aggregate ({each} per process"
              + (f", x{r['speedup_over_one']:.2f} over K=1" if base else "")
              + f"); Table 1's 6 CIFAR-10 runs in {r['table1_cifar10_6_runs_h']:.2f} h", flush=True)
    return out
