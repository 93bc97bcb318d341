"""`sdrun bench`: does stochastic depth turn dropped blocks into saved time, and does the trainer
add nothing on top? Everything is measured in one process, configurations interleaved.

Sections (--sections, all by default; `compile` only on CUDA unless asked for):
  sd        training step time at batch 128, p_L = 0.5 linear vs 1.0 (constant depth): medians
            over repeats, their ratio beside the expected residual compute sum(p_l)/L (0.746
            for L = 54) and beside the fraction of blocks the timed steps actually ran.
  layout    the same step in channels_last vs contiguous memory (decides the trainer's `auto`).
  overhead  images/s of real `sdrun.launch.app.train` epochs (data path, augmentation, statistics,
            logging; on the embedded digits, CIFAR-shaped) vs a bare forward/backward loop over
            pre-made tensors with the same model, gates and device; plus the per-epoch
            checkpoint write, as a fraction of a full CIFAR epoch.
  eval      test-time (every block, branch x p_l) images/s through sdrun.engine.evaluate.evaluate.
  compile   eager vs per-branch torch.compile, p_L = 1.0 and 0.5: images/s and the projected
            time of the paper's 500 CIFAR epochs (45k images each, training only).
  deep      `sd` and `eval` for ResNet-1202 with fewer steps.
Asked for by option (then only these, unless --sections is given too):
  --speed eager,compile,graphs   each speed= mode at p_L 1.0 and 0.5: step time, images/s,
            the projected 500 CIFAR epochs, the SD/constant step ratio (sdrun.engine.speed).
  --concurrent 1,2,4,8           aggregate images/s of K concurrent training processes on the
            device, a fixed timed window after a common start (sdrun.tools.bench_concurrent).
Peak memory: CUDA max_memory_allocated per measurement; on the CPU the process's peak RSS
(monotone over the run, so only an upper bound for the later sections).
The JSON report (--out) is rewritten atomically after every section, after every timed repeat
of the interleaved sections (sd, layout, compile, speed; marked "partial" until the section
ends) and after every K of --concurrent, so a run killed at its time limit keeps every figure
measured before the kill (issue 21).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from sdrun.tools.bench_concurrent import ConcurrentFailure, run_concurrent
from sdrun.config import ConfigError, OptimConfig, Toggle
from sdrun.launch.compose import compose
from sdrun.data.batches import Normalizer, eval_batches
from sdrun.data.readers import Split
from sdrun.errors import ArgParser
from sdrun.engine.state import save_checkpoint
from sdrun.files import write_json
from sdrun.engine.gradstats import GradStats
from sdrun.model.resnet import build_model
from sdrun.engine.optim import make_optimizer
from sdrun.rng import derive_seed, seed_global
from sdrun.engine.runtime import device_info, resolve_runtime, software_versions
from sdrun.engine.runtime import synchronize as sync
from sdrun.engine.speed import apply_speed
from sdrun.model.stochastic import GateSampler, expected_active_blocks, survival_probs
from sdrun.engine.evaluate import evaluate
from sdrun.engine.loop import train_step
from sdrun.launch.app import train

CIFAR_TRAIN_IMAGES = 45_000
PAPER_EPOCHS = 500
SECTIONS = ("sd", "layout", "overhead", "eval", "compile", "deep")


# ---------------------------------------------------------------- helpers

def runtime(device: str, channels_last: str = "auto", precision: str = "auto"):
    return resolve_runtime(OmegaConf.create({"device": device, "precision": precision,
                                             "channels_last": Toggle(channels_last), "deterministic": False}))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_allocated"}
    # ru_maxrss is in KiB on Linux.
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "process_peak_rss"}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class Stepper:
    """A model, its optimiser, its gate sampler and one pre-made batch: the trainer's own
    `train_step` (gradient statistics included), without data path, evaluation or logging."""

    def __init__(self, depth: int, p_last: float, rt, batch_size: int, seed: int = 1, speed: str = "eager"):
        seed_global(seed)
        self.rt = rt
        fmt = torch.channels_last if rt.channels_last else torch.contiguous_format
        self.model = build_model("cifar_resnet", depth, 10, p_last, "linear").to(rt.device, memory_format=fmt)
        apply_speed(self.model, speed, rt.device)  # eager | compile | graphs (sdrun.engine.speed)
        self.optimizer = make_optimizer(self.model, OmegaConf.structured(OptimConfig))  # the paper's SGD
        self.grad_stats = GradStats(self.model)
        self.gates = GateSampler(self.model.survival_probs, derive_seed(seed, "gates"))
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch_size, 3, 32, 32, generator=g).to(rt.device, memory_format=fmt)
        self.y = torch.randint(0, 10, (batch_size,), generator=g).to(rt.device)
        self.num_blocks = len(self.model.survival_probs)

    def steps(self, n: int, batches: list | None = None) -> tuple[float, int]:
        """Run n training steps; (seconds, blocks run)."""
        self.model.train()
        active = 0
        sync(self.rt.device)
        t0 = time.perf_counter()
        for i in range(n):
            x, y = batches[i % len(batches)] if batches else (self.x, self.y)
            step_gates = self.gates.draw()
            train_step(self.model, self.optimizer, x, y, step_gates, self.rt, grad_stats=self.grad_stats)
            active += sum(step_gates)
        sync(self.rt.device)
        self.grad_stats.end_epoch()  # read and reset the accumulators, as the trainer does once per epoch
        return time.perf_counter() - t0, active


Progress = Callable[[dict], None]  # receives a section's partial result (its "partial" key says how far)


def interleaved(steppers: dict[str, Stepper], steps: int, repeats: int, warmup: int,
                progress: Callable[[dict, int], None] | None = None) -> dict:
    """Per-step times of each stepper, repeats interleaved in ABBA order to cancel drift.

    progress(runs so far, repeats done) after every repeat but the last, so that a caller can
    save what is measured before a kill."""
    for s in steppers.values():
        s.steps(warmup)
    names = list(steppers)
    times = {n: [] for n in names}
    active = {n: 0 for n in names}

    def runs() -> dict:
        done = len(times[names[0]])
        return {n: {"step_s_median": median(times[n]), "step_s_all": times[n],
                    "images_per_s": len(s.y) / median(times[n]),
                    "active_blocks_mean": active[n] / (steps * done), "num_blocks": s.num_blocks}
                for n, s in steppers.items()}

    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            dt, a = steppers[n].steps(steps)
            times[n].append(dt / steps)
            active[n] += a
        if progress and r + 1 < repeats:
            progress(runs(), r + 1)
    return runs()


def repeats_progress(progress: Progress | None, summary: Callable[[dict], dict], repeats: int):
    """interleaved's progress callback for a section: its summary of the runs so far, marked partial."""
    if progress is None:
        return None
    return lambda runs, done: progress({**summary(runs), "partial": f"{done} of {repeats} timed repeats"})


def warm_up(steppers: dict[str, Stepper], steps: int, progress: Progress | None, what: str) -> dict:
    """The untimed steps that compile the branches / capture the graphs, configuration by
    configuration; the seconds each took (its compile or capture time, mostly) are saved after each."""
    seconds = {}
    for i, (name, s) in enumerate(steppers.items()):
        t0 = time.perf_counter()
        s.steps(steps)
        seconds[name] = time.perf_counter() - t0
        if progress:
            progress({"partial": f"{what} {i + 1} of {len(steppers)} configurations, nothing timed yet",
                      "warmup_s": dict(seconds)})
    return seconds


# ---------------------------------------------------------------- sections

def bench_sd(depth: int, rt, a, progress: Progress | None = None) -> dict:
    reset_peak(rt.device)
    steppers = {"pL=1.0": Stepper(depth, 1.0, rt, a.batch_size), "pL=0.5": Stepper(depth, 0.5, rt, a.batch_size)}
    repeats = a.repeats if depth == a.depth else a.deep_repeats

    def summary(res: dict) -> dict:
        num_blocks = res["pL=1.0"]["num_blocks"]
        sd, const = res["pL=0.5"], res["pL=1.0"]
        return {"depth": depth, "batch_size": a.batch_size, "runs": res,
                "ratio_sd_over_constant": sd["step_s_median"] / const["step_s_median"],
                # Each repeat's pair was timed back to back: robust to load that drifts over the run.
                "ratio_paired_median": median([s / c for s, c in zip(sd["step_s_all"], const["step_s_all"])]),
                "theory_expected_compute": expected_active_blocks(survival_probs(num_blocks, 0.5)) / num_blocks,
                "theory_for_timed_gates": sd["active_blocks_mean"] / num_blocks,
                **peak_memory(rt.device)}

    return summary(interleaved(steppers, a.steps if depth == a.depth else a.deep_steps, repeats, a.warmup,
                               repeats_progress(progress, summary, repeats)))


def bench_layout(a, progress: Progress | None = None) -> dict:
    """channels_last vs contiguous for the same training step (p_L = 1.0, fixed compute)."""
    steppers = {"contiguous": Stepper(a.depth, 1.0, runtime(a.device, "off", a.precision), a.batch_size),
                "channels_last": Stepper(a.depth, 1.0, runtime(a.device, "on", a.precision), a.batch_size)}

    def summary(res: dict) -> dict:
        return {"depth": a.depth, "runs": res, "speedup_channels_last":
                res["contiguous"]["step_s_median"] / res["channels_last"]["step_s_median"]}

    return summary(interleaved(steppers, a.steps, a.repeats, a.warmup, repeats_progress(progress, summary, a.repeats)))


def bench_eval(depth: int, rt, a) -> dict:
    reset_peak(rt.device)
    stepper = Stepper(depth, 0.5, rt, a.batch_size)
    n = a.eval_images if depth == a.depth else a.eval_images // 4
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (n,), generator=g)).to(rt.device)
    norm = Normalizer.fit(split.images).to(rt.device)
    run = lambda: evaluate(stepper.model, eval_batches(split, norm, a.eval_batch_size, rt.channels_last), rt)  # noqa: E731
    run()  # warm-up
    times = []
    for _ in range(max(1, a.repeats // 2)):
        sync(rt.device)
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"depth": depth, "images": n, "eval_batch_size": a.eval_batch_size,
            "images_per_s": n / median(times), "seconds_all": times, **peak_memory(rt.device)}


def bench_overhead(rt, a) -> dict:
    """Real sdrun.engine.loop epochs vs the bare step loop over the same gates on pre-made batches."""
    steps = a.trainer_steps
    overrides = ["dataset=digits", f"depth={a.depth}", f"batch_size={a.batch_size}", "epochs=2",
                 f"max_steps_per_epoch={steps}", "checkpoint=true", f"device={rt.device}",
                 f"channels_last={'on' if rt.channels_last else 'off'}", f"precision={rt.precision}"]
    cfg = compose(*overrides)
    trainer_ips, bare_ips, syncs = [], [], []
    bare = Stepper(a.depth, cfg.pL, rt, a.batch_size, seed=cfg.seed)
    g = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if rt.channels_last else torch.contiguous_format
    batches = [(torch.randn(a.batch_size, 3, 32, 32, generator=g).to(rt.device, memory_format=fmt),
                torch.randint(0, 10, (a.batch_size,), generator=g).to(rt.device)) for _ in range(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.trainer_repeats):
            # The trainer's second epoch (the first warms up) against the bare loop drawing the
            # same gates: the sampler restarts from the run's seed, skips epoch 1's draws.
            bare.gates = GateSampler(bare.model.survival_probs, derive_seed(cfg.seed, "gates"))
            bare.steps(steps, batches)
            dt, _ = bare.steps(steps, batches)
            bare_ips.append(steps * a.batch_size / dt)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if rt.device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    train(cfg, Path(tmp) / f"run{r}")
                finally:
                    if rt.device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            syncs.append(sum("synchroniz" in str(w.message).lower() for w in caught))
            rows = [json.loads(line) for line in (Path(tmp) / f"run{r}" / "metrics.jsonl").read_text().splitlines()]
            trainer_ips.append(rows[-1]["images_per_s"])
        # The per-epoch fixed cost the loop timing does not include: the checkpoint write.
        t0 = time.perf_counter()
        save_checkpoint(Path(tmp) / "ckpt.pt", {"model": bare.model.state_dict(),
                                                "optimizer": bare.optimizer.state_dict()})
        ckpt_s = time.perf_counter() - t0
    t, b = median(trainer_ips), median(bare_ips)
    full_epoch_s = CIFAR_TRAIN_IMAGES / t
    out = {"depth": a.depth, "steps_per_epoch": steps, "trainer_images_per_s": t, "bare_images_per_s": b,
           "trainer_images_per_s_all": trainer_ips, "bare_images_per_s_all": bare_ips,
           "overhead_fraction": 1.0 - t / b, "checkpoint_write_s": ckpt_s,
           "checkpoint_fraction_of_cifar_epoch": ckpt_s / full_epoch_s,
           "data": "digits (embedded, 3x32x32, the device path with translation)"}
    if rt.device.type == "cuda":
        out["host_syncs_in_two_epochs_of_train"] = syncs
    return out


def bench_compile(rt, a, progress: Progress | None = None) -> dict:
    """Eager vs per-branch compiled, constant depth vs stochastic depth; projected 500 epochs."""
    steppers = {f"{mode} pL={p}": Stepper(a.depth, p, rt, a.batch_size, speed="compile" if mode == "compiled" else "eager")
                for mode in ("eager", "compiled") for p in (1.0, 0.5)}
    warm = warm_up(steppers, a.compile_warmup, progress, "compiled")  # every branch shape, before timing

    def summary(res: dict) -> dict:
        for r in res.values():
            r["projected_500_epochs_h"] = PAPER_EPOCHS * CIFAR_TRAIN_IMAGES / r["images_per_s"] / 3600
        return {"depth": a.depth, "runs": res, "warmup_and_compile_s": sum(warm.values()), "warmup_s": warm,
                "speedup_compiled_pL=1.0": res["eager pL=1.0"]["step_s_median"] / res["compiled pL=1.0"]["step_s_median"],
                "speedup_compiled_pL=0.5": res["eager pL=0.5"]["step_s_median"] / res["compiled pL=0.5"]["step_s_median"],
                "ratio_sd_over_constant_compiled":
                    res["compiled pL=0.5"]["step_s_median"] / res["compiled pL=1.0"]["step_s_median"],
                **peak_memory(rt.device)}

    return summary(interleaved(steppers, a.steps, a.repeats, 0, repeats_progress(progress, summary, a.repeats)))


def bench_speed(rt, a, modes: list[str], progress: Progress | None = None) -> dict:
    """`--speed eager,compile,graphs`: each mode at p_L = 1.0 and 0.5, interleaved; per mode the
    step time, images/s, the projected 500 CIFAR epochs and the SD/constant step ratio."""
    steppers = {f"{mode} pL={p}": Stepper(a.depth, p, rt, a.batch_size, speed=mode) for mode in modes for p in (1.0, 0.5)}
    # Compile every branch shape / capture every graph before timing.
    warm = warm_up(steppers, a.compile_warmup, progress, "warmed up (compiled / captured)")

    def summary(res: dict) -> dict:
        modes_out = {}
        for mode in modes:
            const, sd = res[f"{mode} pL=1.0"], res[f"{mode} pL=0.5"]
            modes_out[mode] = {
                "step_s_pL=1.0": const["step_s_median"], "step_s_pL=0.5": sd["step_s_median"],
                "images_per_s_pL=1.0": const["images_per_s"], "images_per_s_pL=0.5": sd["images_per_s"],
                "projected_500_epochs_min_pL=0.5": PAPER_EPOCHS * CIFAR_TRAIN_IMAGES / sd["images_per_s"] / 60,
                "ratio_sd_over_constant": sd["step_s_median"] / const["step_s_median"],
                "theory_for_timed_gates": sd["active_blocks_mean"] / sd["num_blocks"]}
        return {"depth": a.depth, "batch_size": a.batch_size, "modes": modes_out, "runs": res,
                "warmup_and_capture_s": sum(warm.values()), "warmup_s": warm, **peak_memory(rt.device)}

    return summary(interleaved(steppers, a.steps, a.repeats, 0, repeats_progress(progress, summary, a.repeats)))


def print_speed(r: dict) -> None:
    for mode, m in r["modes"].items():
        print(f"speed    ResNet-{r['depth']} {mode:8s}: pL=0.5 {1000 * m['step_s_pL=0.5']:.1f} ms/step "
              f"{m['images_per_s_pL=0.5']:.0f} img/s, pL=1.0 {1000 * m['step_s_pL=1.0']:.1f} ms/step; "
              f"SD/constant {m['ratio_sd_over_constant']:.3f} (blocks run {m['theory_for_timed_gates']:.3f}); "
              f"500 CIFAR epochs (pL=0.5) in {m['projected_500_epochs_min_pL=0.5']:.1f} min", flush=True)


def int_list(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every K must be at least 1")
    return ks


# ---------------------------------------------------------------- command

def environment(rt) -> dict:
    env = {"device": str(rt.device), "precision": rt.precision, "hardware": device_info(rt.device),
           "channels_last": rt.channels_last,
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "load_avg_1_5_15_at_start": os.getloadavg(), "processor": platform.processor(),
           "versions": software_versions()}
    try:
        env["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if rt.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(rt.device)
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return env


def parse(argv: list[str]) -> argparse.Namespace:
    p = ArgParser(prog="sdrun bench", description=__doc__.split("\n\n")[0],
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; compile on CUDA only)")
    p.add_argument("--depth", type=int, default=110)
    p.add_argument("--deep-depth", type=int, default=1202)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    p.add_argument("--deep-steps", type=int, default=1)
    p.add_argument("--deep-repeats", type=int, default=3)
    p.add_argument("--trainer-steps", type=int, default=4, help="steps per epoch of the real trainer runs")
    p.add_argument("--trainer-repeats", type=int, default=2)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--compile-warmup", type=int, default=10, help="untimed steps that compile the branches")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "tf32", "bf16"),
                   help="training arithmetic of every section (auto: tf32 on CUDA, fp32 on the CPU)")
    p.add_argument("--speed", default=None, metavar="MODES",
                   help="the speed section for these modes, e.g. eager,compile,graphs (graphs: CUDA only)")
    p.add_argument("--concurrent", type=int_list, default=None, metavar="KS",
                   help="aggregate images/s of K concurrent training processes on the device, e.g. 1,2,4,8")
    p.add_argument("--concurrent-speed", default="eager", help="speed mode of the concurrent processes")
    p.add_argument("--concurrent-pL", type=float, default=0.5, help="p_L of the concurrent processes")
    p.add_argument("--window", type=float, default=20.0, help="concurrent: seconds every process trains, timed")
    p.add_argument("--chunk", type=int, default=10, help="concurrent: steps between device synchronisations")
    p.add_argument("--barrier-timeout", type=float, default=600.0,
                   help="concurrent: seconds to wait for every process to finish its warm-up")
    p.add_argument("--out", default="bench.json", help="where the JSON report goes")
    a = p.parse_args(argv)
    for name in ("steps", "repeats", "deep_steps", "deep_repeats", "trainer_steps", "trainer_repeats",
                 "eval_images", "eval_batch_size", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.trainer_steps > 9:
        p.error("--trainer-steps must be at most 9 (the embedded digits give 9 full batches of 128)")
    check_speed_options(p, a)
    return a


def check_speed_options(p, a) -> None:
    """--speed and --concurrent: modes known, window and chunk positive."""
    from sdrun.config import Speed

    modes = a.speed.split(",") if a.speed else []
    for mode in modes + [a.concurrent_speed]:
        if mode not in [s.value for s in Speed]:
            p.error(f"unknown speed mode {mode!r} (choose from {', '.join(s.value for s in Speed)})")
    if a.window <= 0 or a.chunk < 1:
        p.error("--window must be positive and --chunk at least 1")


def run_bench(argv: list[str]) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        rt = runtime(a.device, precision=a.precision)
    except ConfigError as e:
        print(f"sdrun bench: error: {e}", file=sys.stderr)
        return 2
    if speed_problem(a, rt):
        print(f"sdrun bench: error: {speed_problem(a, rt)}", file=sys.stderr)
        return 2
    wanted = a.sections.split(",") if a.sections else [s for s in SECTIONS if s != "compile" or rt.device.type == "cuda"]
    if (a.speed or a.concurrent) and not a.sections:  # asked for these: only these
        wanted = []
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        print(f"sdrun bench: error: unknown section(s) {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})",
              file=sys.stderr)
        return 2
    report = {"environment": environment(rt), "settings": vars(a), "command": sys.argv, "results": {}}
    results = report["results"]
    t_start = time.perf_counter()

    def save():
        """The report as measured so far, atomically (temp file, then rename): a kill at any
        moment leaves the previous complete version, never a truncated file."""
        report["environment"]["load_avg_1_5_15_at_end"] = os.getloadavg()
        report["wall_time_s"] = time.perf_counter() - t_start
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(a.out, report)

    def partial(key: str) -> Progress:
        """A section's progress callback: its partial result under its key, saved at once."""
        def put(part: dict) -> None:
            results[key] = part
            save()
        return put

    save()  # the environment at once: a run killed in its first section still says where it ran

    print(f"sdrun bench on {rt.device} ({report['environment'].get('gpu') or report['environment'].get('cpu_model', '')}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}), precision={rt.precision} "
          f"channels_last={rt.channels_last}", flush=True)
    # Each finished section is saved before its line is printed: a line on the screen means its
    # figures are on disk.
    for section in [s for s in SECTIONS if s in wanted]:
        if section == "sd":
            r = results["sd"] = bench_sd(a.depth, rt, a, partial("sd"))
            save()
            print_sd(r)
        elif section == "layout":
            r = results["layout"] = bench_layout(a, partial("layout"))
            save()
            print(f"layout   ResNet-{a.depth}: contiguous {r['runs']['contiguous']['step_s_median']:.3f} s/step, "
                  f"channels_last {r['runs']['channels_last']['step_s_median']:.3f} s/step "
                  f"(channels_last speed-up x{r['speedup_channels_last']:.3f})", flush=True)
        elif section == "overhead":
            r = results["overhead"] = bench_overhead(rt, a)
            save()
            print(f"overhead ResNet-{a.depth}: sdrun train {r['trainer_images_per_s']:.1f} img/s vs bare loop "
                  f"{r['bare_images_per_s']:.1f} img/s: overhead {100 * r['overhead_fraction']:.1f} %; "
                  f"checkpoint {r['checkpoint_write_s']:.2f} s = {100 * r['checkpoint_fraction_of_cifar_epoch']:.3f} % "
                  f"of a CIFAR epoch", flush=True)
        elif section == "eval":
            r = results["eval"] = bench_eval(a.depth, rt, a)
            save()
            print(f"eval     ResNet-{a.depth}: {r['images_per_s']:.1f} img/s; peak memory "
                  f"{r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']})", flush=True)
        elif section == "deep" and a.deep_depth:
            r = results["deep_sd"] = bench_sd(a.deep_depth, rt, a, partial("deep_sd"))
            save()
            print_sd(r)
            r = results["deep_eval"] = bench_eval(a.deep_depth, rt, a)
            save()
            print(f"eval     ResNet-{a.deep_depth}: {r['images_per_s']:.1f} img/s; peak memory "
                  f"{r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']})", flush=True)
        elif section == "compile":
            r = results["compile"] = bench_compile(rt, a, partial("compile"))
            save()
            for name, run in r["runs"].items():
                print(f"compile  ResNet-{a.depth} {name}: {run['images_per_s']:.0f} img/s, "
                      f"500 CIFAR epochs in {run['projected_500_epochs_h']:.2f} h", flush=True)
    try:
        run_speed_sections(a, rt, results, save)
    except ConcurrentFailure as e:  # a concurrent process failed (out of memory, ...): say which, keep the rest
        save()
        print(f"sdrun bench: error: {e}", file=sys.stderr)
        return 1
    save()
    print(f"wrote {a.out}")
    return 0


def speed_problem(a, rt) -> str | None:
    """A speed mode this device cannot run (graphs on the CPU), found before anything runs."""
    from sdrun.engine.speed import resolve_speed

    try:
        for mode in (a.speed.split(",") if a.speed else []) + ([a.concurrent_speed] if a.concurrent else []):
            resolve_speed(mode, rt.device)
    except ConfigError as e:
        return str(e)
    return None


def run_speed_sections(a, rt, results: dict, save) -> None:
    """--speed and --concurrent (issue 13), after the other sections."""
    if a.speed:
        def put(part: dict) -> None:  # the section's partial result, saved at once
            results["speed"] = part
            save()

        r = results["speed"] = bench_speed(rt, a, a.speed.split(","), put)
        save()
        print_speed(r)
    if a.concurrent:
        results["concurrent"] = {}  # filled K by K and saved after each, so a failure or a kill keeps the Ks before it
        run_concurrent(a.concurrent, a, str(rt.device), rt.device.type, results["concurrent"], after_each=save)
        save()


def print_sd(r: dict) -> None:
    c, s = r["runs"]["pL=1.0"], r["runs"]["pL=0.5"]
    print(f"sd       ResNet-{r['depth']} batch {r['batch_size']}: pL=1.0 {c['step_s_median']:.3f} s/step, "
          f"pL=0.5 linear {s['step_s_median']:.3f} s/step: ratio {r['ratio_sd_over_constant']:.3f} "
          f"(median of paired repeats {r['ratio_paired_median']:.3f}) "
          f"(theory {r['theory_expected_compute']:.3f}; blocks run in the timed steps "
          f"{r['theory_for_timed_gates']:.3f}); peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB "
          f"({r['peak_memory_kind']})", flush=True)
