"""`sdrun bench`: does stochastic depth turn dropped blocks into saved time, and does the trainer
add nothing on top? Everything is measured in one process, configurations interleaved.

Every configuration is a run's config, composed as `sdrun train OVERRIDES` composes it, and
built by the same sdrun.engine.setup.build_run that `sdrun train` and `check=true` call: the
bench times the network, optimiser, gates, gradient statistics and data path that a run of
that config trains with (sdrun.tools.stepper). With the defaults that is fidelity=reference's
network (subsampling shortcuts, BatchNorm gamma ~ U(0, 1)), as `sdrun train` builds it.
The overrides, in this order: dataset=digits (embedded, 32x32x3 like CIFAR, no files; unless
--set names another dataset, e.g. --set dataset=cifar10 --set dataset.root=DIR),
depth=--depth, batch_size=--batch-size, device=--device, precision=--precision (if given),
eval_batch_size=--eval-batch-size, then every --set KEY=VALUE (e.g. --set fidelity=paper,
--set seed=2, --set speed=compile), then what a section varies, which wins over --set (pL;
speed in compile and --speed; channels_last in layout; epochs, max_steps_per_epoch and
checkpoint in overhead). A timed step is sdrun.engine.loop.train_step on the
run's next full batch, made by the run's data path (on the device, as in training), with the
run's next gates and gradient statistics; an epoch's smaller last batch is left out. (An
epoch of the digits is 9 such steps at batch 128, so its per-epoch costs, the draw of order and
augmentation and the gradient statistics' read-back, recur every 9 steps: sdrun.tools.stepper.)

Sections (--sections, all by default; `compile` only on CUDA unless asked for):
  sd        training step time, p_L = 0.5 (survival=, linear by default) vs 1.0 (constant
            depth): medians over repeats, their ratio beside the expected residual compute
            sum(p_l)/L (0.746 for L = 54, linear) and beside the fraction of blocks the timed
            steps actually ran.
  layout    the same step with channels_last=off vs on (decides the trainer's `auto`).
  overhead  images/s of real `sdrun train` epochs (sdrun.launch.app.train, 2 epochs of
            --trainer-steps steps: the epoch's statistics, stop polling, logging; evaluation
            is outside its timing, as in metrics.jsonl) vs a bare loop of the same steps over
            the same built run (its batches, its gates: only train_step): what the trainer
            adds. Beside it the bare loop over pre-made batches (the same run's epoch, made
            before timing): what the data path costs. Plus the per-epoch checkpoint write
            (the trainer's own), as a fraction of a full CIFAR epoch.
  eval      test-time (every block, branch x p_l) images/s through sdrun.engine.evaluate.evaluate
            over --eval-images images of the run's own test batches (its passes repeated).
  compile   speed=eager vs compile (per-branch torch.compile), p_L = 1.0 and 0.5: images/s and
            the projected time of the paper's 500 CIFAR epochs (45k images each, training only).
  deep      `sd` and `eval` at --deep-depth (ResNet-1202) with fewer steps.
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
measured before the kill (issue 21). It records the base configuration (`config`, with the
fidelity preset it matches) beside the options.
"""

from __future__ import annotations

import argparse
import copy
import functools
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
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdrun import fidelity
from sdrun.config import ConfigError, Speed, to_plain
from sdrun.engine.evaluate import evaluate
from sdrun.engine.runtime import device_info, resolve_runtime, software_versions, synchronize
from sdrun.engine.speed import resolve_speed
from sdrun.errors import ArgParser, UserError, one_line, print_error
from sdrun.files import write_json
from sdrun.launch.app import train
from sdrun.launch.compose import compose
from sdrun.launch.guard import USER_ERRORS
from sdrun.launch.preflight import job_problem
from sdrun.model.stochastic import expected_active_blocks
from sdrun.rundir import CHECKPOINT
from sdrun.tools.bench_concurrent import ConcurrentFailure, run_concurrent
from sdrun.tools.stepper import Stepper
from sdrun.paper import CIFAR_EPOCHS, CIFAR_TRAIN_IMAGES
from sdrun.rundir import METRICS, read_jsonl

SECTIONS = ("sd", "layout", "overhead", "eval", "compile", "deep")
# Config keys the bench's own options set (a --set of one is refused, naming the option).
OWN_KEYS = {"depth": "--depth (and --deep-depth)", "batch_size": "--batch-size", "device": "--device",
            "precision": "--precision", "eval_batch_size": "--eval-batch-size",
            "pL": "each section sets p_L itself (sd, compile, --speed: 1.0 and 0.5; --concurrent-pL)"}


# ---------------------------------------------------------------- configurations

def overrides(a: argparse.Namespace, **keys) -> list[str]:
    """A configuration's overrides of `sdrun train`: the bench's options (the keys of OWN_KEYS,
    which --set may not name), then --set, then the section's own keys (`keys`, e.g. pL=0.5),
    last so that a section compares what it says it compares whatever --set holds."""
    named = {kv.split("=", 1)[0].lstrip("+~") for kv in a.set}
    options = {"depth": a.depth, "batch_size": a.batch_size, "device": a.device, "precision": a.precision,
               "eval_batch_size": a.eval_batch_size}
    if a.precision is None:  # the config's own, as `sdrun train` runs it
        del options["precision"]
    return ([] if "dataset" in named else ["dataset=digits"]) + \
        [f"{k}={v}" for k, v in options.items() if k not in keys] + a.set + [f"{k}={v}" for k, v in keys.items()]


def config(a: argparse.Namespace, **keys) -> DictConfig:
    """The composed, checked config of one configuration: `sdrun train` with overrides(a, **keys).

    The options and --set are composed once (Hydra's compose takes ~0.3 s, a dozen times per
    bench); a section's own keys are then set as Hydra sets a command line's KEY=VALUE of a
    plain key once the defaults are merged (OmegaConf.update: typed, no new keys), and the
    result is checked like a composed job (tests/test_bench.py compares it with compose's)."""
    cfg = copy.deepcopy(composed(tuple(overrides(a))))
    for key, value in keys.items():
        try:
            OmegaConf.update(cfg, key, value)
        except OmegaConfBaseException as e:  # a value of the wrong type
            raise ConfigError(one_line(e)) from None
    problem = job_problem(cfg, None)  # as the pre-flight checks a job: values, device, the dataset's files
    if problem:
        raise ConfigError(problem)
    return cfg


@functools.lru_cache(maxsize=4)
def composed(overrides: tuple[str, ...]) -> DictConfig:
    """The config `sdrun train OVERRIDES` runs (Hydra's compose API, sdrun.launch.compose), or a
    one-line ConfigError; remembered (config copies it before changing anything)."""
    try:
        return compose(*overrides)
    except USER_ERRORS as e:  # an unknown key or group, a value of the wrong type, a bad override
        raise ConfigError(one_line(e)) from None


# ---------------------------------------------------------------- helpers

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
                    "images_per_s": s.batch_size / median(times[n]),
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
    steppers = {f"pL={p}": Stepper(config(a, depth=depth, pL=p)) for p in (1.0, 0.5)}
    repeats = a.repeats if depth == a.depth else a.deep_repeats
    probs = steppers["pL=0.5"].model.survival_probs  # the run's rule (survival=, linear by default)

    def summary(res: dict) -> dict:
        num_blocks = res["pL=1.0"]["num_blocks"]
        sd, const = res["pL=0.5"], res["pL=1.0"]
        return {"depth": depth, "batch_size": a.batch_size, "survival": str(steppers["pL=0.5"].cfg.survival),
                "runs": res,
                "ratio_sd_over_constant": sd["step_s_median"] / const["step_s_median"],
                # Each repeat's pair was timed back to back: robust to load that drifts over the run.
                "ratio_paired_median": median([s / c for s, c in zip(sd["step_s_all"], const["step_s_all"])]),
                "theory_expected_compute": expected_active_blocks(probs) / num_blocks,
                "theory_for_timed_gates": sd["active_blocks_mean"] / num_blocks,
                **peak_memory(rt.device)}

    return summary(interleaved(steppers, a.steps if depth == a.depth else a.deep_steps, repeats, a.warmup,
                               repeats_progress(progress, summary, repeats)))


def bench_layout(a, progress: Progress | None = None) -> dict:
    """channels_last=off vs on for the same training step (p_L = 1.0, fixed compute); the
    run's data path makes its batches in the layout the model is in, as in training."""
    steppers = {name: Stepper(config(a, pL=1.0, channels_last=toggle))
                for name, toggle in (("contiguous", "off"), ("channels_last", "on"))}

    def summary(res: dict) -> dict:
        return {"depth": a.depth, "runs": res, "speedup_channels_last":
                res["contiguous"]["step_s_median"] / res["channels_last"]["step_s_median"]}

    return summary(interleaved(steppers, a.steps, a.repeats, a.warmup, repeats_progress(progress, summary, a.repeats)))


def eval_passes(stepper: Stepper, n: int):
    """n images of the run's test split as its evaluation makes them (sdrun.data: eval_batch_size,
    normaliser, memory layout), its passes repeated as needed, the last batch cut to n."""
    left = n
    while left:
        for x, y in stepper.run.data.eval_sets["test"]():
            take = min(left, len(y))
            yield x[:take], y[:take]
            left -= take
            if not left:
                return


def bench_eval(depth: int, rt, a) -> dict:
    reset_peak(rt.device)
    stepper = Stepper(config(a, depth=depth, pL=0.5))
    n = a.eval_images if depth == a.depth else a.eval_images // 4
    run = lambda: evaluate(stepper.model, eval_passes(stepper, n), stepper.rt)  # noqa: E731
    run()  # warm-up
    times = []
    for _ in range(max(1, a.repeats // 2)):
        synchronize(rt.device)
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"depth": depth, "images": n, "eval_batch_size": a.eval_batch_size, "dataset": stepper.cfg.dataset.name,
            "images_per_s": n / median(times), "seconds_all": times, **peak_memory(rt.device)}


def bench_overhead(rt, a) -> dict:
    """Real `sdrun train` epochs vs bare loops over the same built run (its batches, or an epoch
    of them made beforehand), each epoch 2 after an untimed epoch 1."""
    # A constant lr: the recipe's milestones lie past 2 epochs (and the lr does not change a step's time)
    cfg = config(a, pL=0.5, epochs=2, max_steps_per_epoch=a.trainer_steps, checkpoint=True,
                 **{"optim.milestones": []})
    trainer_ips, bare_ips, premade_ips, syncs = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.trainer_repeats):
            # Each loop is a fresh build of the run the trainer is about to train: the same
            # weights, batches and gates (one seed); epoch 2 timed, as the trainer's is read below.
            bare = Stepper(cfg)
            bare.epoch()
            dt, images = bare.epoch()
            bare_ips.append(images / dt)
            steps = len(bare.run.state.batches)
            premade = Stepper(cfg)
            batches = premade.premade_epoch()
            premade.epoch(batches)
            dt, images = premade.epoch(batches)
            premade_ips.append(images / dt)
            del premade, batches
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
            rows = read_jsonl(Path(tmp) / f"run{r}" / METRICS)
            trainer_ips.append(rows[-1]["images_per_s"])
        # The per-epoch fixed cost the loop timing does not include: the checkpoint write, the
        # trainer's own (sdrun.engine.state.TrainState.save: weights, optimiser, generators).
        t0 = time.perf_counter()
        bare.run.state.save(Path(tmp) / CHECKPOINT, to_plain(cfg))
        ckpt_s = time.perf_counter() - t0
    t, b, p = median(trainer_ips), median(bare_ips), median(premade_ips)
    full_epoch_s = CIFAR_TRAIN_IMAGES / t
    out = {"depth": a.depth, "steps_per_epoch": steps, "trainer_images_per_s": t, "bare_images_per_s": b,
           "premade_images_per_s": p, "trainer_images_per_s_all": trainer_ips, "bare_images_per_s_all": bare_ips,
           "premade_images_per_s_all": premade_ips,
           "overhead_fraction": 1.0 - t / b,                     # what train_epoch and fit add to the steps
           "data_path_fraction": 1.0 - b / p,                    # what making the batches costs the bare loop
           "overhead_with_data_path_fraction": 1.0 - t / p,     # both: the trainer vs pre-made batches
           "checkpoint_write_s": ckpt_s, "checkpoint_fraction_of_cifar_epoch": ckpt_s / full_epoch_s,
           "data": f"{cfg.dataset.name} through the run's data path (dataset.loader={cfg.dataset.loader}), "
                   f"{steps} steps of batch {cfg.batch_size} per epoch"}
    if rt.device.type == "cuda":
        out["host_syncs_in_two_epochs_of_train"] = syncs
    return out


def bench_compile(rt, a, progress: Progress | None = None) -> dict:
    """Eager vs per-branch compiled, constant depth vs stochastic depth; projected 500 epochs."""
    steppers = {f"{mode} pL={p}": Stepper(config(a, pL=p, speed="compile" if mode == "compiled" else "eager"))
                for mode in ("eager", "compiled") for p in (1.0, 0.5)}
    warm = warm_up(steppers, a.compile_warmup, progress, "compiled")  # every branch shape, before timing

    def summary(res: dict) -> dict:
        for r in res.values():
            r["projected_500_epochs_h"] = CIFAR_EPOCHS * CIFAR_TRAIN_IMAGES / r["images_per_s"] / 3600
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
    steppers = {f"{mode} pL={p}": Stepper(config(a, pL=p, speed=mode)) for mode in modes for p in (1.0, 0.5)}
    # Compile every branch shape / capture every graph before timing.
    warm = warm_up(steppers, a.compile_warmup, progress, "warmed up (compiled / captured)")

    def summary(res: dict) -> dict:
        modes_out = {}
        for mode in modes:
            const, sd = res[f"{mode} pL=1.0"], res[f"{mode} pL=0.5"]
            modes_out[mode] = {
                "step_s_pL=1.0": const["step_s_median"], "step_s_pL=0.5": sd["step_s_median"],
                "images_per_s_pL=1.0": const["images_per_s"], "images_per_s_pL=0.5": sd["images_per_s"],
                "projected_500_epochs_min_pL=0.5": CIFAR_EPOCHS * CIFAR_TRAIN_IMAGES / sd["images_per_s"] / 60,
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
    paragraphs = __doc__.split("\n\n")
    p = ArgParser(prog="sdrun bench", description="\n\n".join(paragraphs[:2]), epilog="\n\n".join(paragraphs[2:]),
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="device=: auto | cpu | cuda | cuda:N")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; compile on CUDA only)")
    p.add_argument("--depth", type=int, default=110, help="depth= of every section but deep (default 110)")
    p.add_argument("--deep-depth", type=int, default=1202, help="depth= of the deep section (default 1202)")
    p.add_argument("--batch-size", type=int, default=128, help="batch_size= (default 128)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override of sdrun train, repeatable: --set fidelity=paper, "
                        "--set dataset=cifar10 --set dataset.root=DIR, --set seed=2")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    p.add_argument("--deep-steps", type=int, default=1)
    p.add_argument("--deep-repeats", type=int, default=3)
    p.add_argument("--trainer-steps", type=int, default=4,
                   help="overhead: max_steps_per_epoch= of the trainer's 2 epochs (an epoch has at most its dataset's)")
    p.add_argument("--trainer-repeats", type=int, default=2)
    p.add_argument("--eval-images", type=int, default=2000, help="eval: images of the run's test batches timed")
    p.add_argument("--eval-batch-size", type=int, default=500, help="eval_batch_size= (default 500)")
    p.add_argument("--compile-warmup", type=int, default=10, help="untimed steps that compile the branches")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU) for this process")
    p.add_argument("--precision", default=None, choices=("auto", "fp32", "tf32", "bf16"),
                   help="precision= of every section (default: the config's, as `sdrun train` runs it: fp32 under "
                        "fidelity=reference, auto = tf32 on CUDA and fp32 on the CPU under fidelity=paper)")
    p.add_argument("--speed", default=None, metavar="MODES",
                   help="the speed section for these speed= modes, e.g. eager,compile,graphs (graphs: CUDA only)")
    p.add_argument("--concurrent", type=int_list, default=None, metavar="KS",
                   help="aggregate images/s of K concurrent training processes on the device, e.g. 1,2,4,8")
    p.add_argument("--concurrent-speed", default="eager", help="speed= of the concurrent processes")
    p.add_argument("--concurrent-pL", type=float, default=0.5, help="pL= of the concurrent processes")
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
    for kv in a.set:
        key = kv.split("=", 1)[0].lstrip("+~")
        if "=" not in kv or not key:
            p.error(f"--set {kv}: expected KEY=VALUE, a config override of sdrun train (e.g. fidelity=paper)")
        if key in OWN_KEYS:
            p.error(f"--set {kv}: {'use ' if key != 'pL' else ''}{OWN_KEYS[key]}")
    check_speed_options(p, a)
    return a


def check_speed_options(p, a) -> None:
    """--speed and --concurrent: modes known, window and chunk positive."""
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
        base = config(a)  # the options and --set composed and checked before anything runs
        rt = resolve_runtime(base)
    except ConfigError as e:
        print_error("sdrun bench", e)
        return 2
    if speed_problem(a, rt):
        print_error("sdrun bench", speed_problem(a, rt))
        return 2
    wanted = a.sections.split(",") if a.sections else [s for s in SECTIONS if s != "compile" or rt.device.type == "cuda"]
    if (a.speed or a.concurrent) and not a.sections:  # asked for these: only these
        wanted = []
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        print_error("sdrun bench", f"unknown section(s) {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})")
        return 2
    preset = fidelity.summary(base)["preset"]
    report = {"environment": environment(rt), "settings": vars(a), "command": sys.argv,
              "config": {"overrides": overrides(a), "fidelity": preset, "composed": to_plain(base)}, "results": {}}
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
          f"channels_last={rt.channels_last}; dataset={base.dataset.name} fidelity={preset}", flush=True)
    try:
        run_sections(a, rt, wanted, results, save, partial)
        run_speed_sections(a, rt, results, save)
    except ConcurrentFailure as e:  # a concurrent process failed (out of memory, ...): say which, keep the rest
        save()
        print_error("sdrun bench", e)
        return 1
    except UserError as e:  # found when a configuration is built: data unreadable, a batch larger than the data
        save()
        print_error("sdrun bench", e)
        return 2
    save()
    print(f"wrote {a.out}")
    return 0


def run_sections(a, rt, wanted: list[str], results: dict, save, partial: Callable[[str], Progress]) -> None:
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
                  f"{r['bare_images_per_s']:.1f} img/s over the same run: overhead {100 * r['overhead_fraction']:.1f} %; "
                  f"data path {100 * r['data_path_fraction']:.1f} % of the bare loop (pre-made batches "
                  f"{r['premade_images_per_s']:.1f} img/s); checkpoint {r['checkpoint_write_s']:.2f} s = "
                  f"{100 * r['checkpoint_fraction_of_cifar_epoch']:.3f} % of a CIFAR epoch", flush=True)
        elif section == "eval":
            r = results["eval"] = bench_eval(a.depth, rt, a)
            save()
            print_eval(r)
        elif section == "deep" and a.deep_depth:
            r = results["deep_sd"] = bench_sd(a.deep_depth, rt, a, partial("deep_sd"))
            save()
            print_sd(r)
            r = results["deep_eval"] = bench_eval(a.deep_depth, rt, a)
            save()
            print_eval(r)
        elif section == "compile":
            r = results["compile"] = bench_compile(rt, a, partial("compile"))
            save()
            for name, run in r["runs"].items():
                print(f"compile  ResNet-{a.depth} {name}: {run['images_per_s']:.0f} img/s, "
                      f"500 CIFAR epochs in {run['projected_500_epochs_h']:.2f} h", flush=True)


def speed_problem(a, rt) -> str | None:
    """A speed mode this device cannot run (graphs on the CPU), found before anything runs."""
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
        keys = {"pL": a.concurrent_pL, "speed": a.concurrent_speed}
        run = {"overrides": overrides(a, **keys), "depth": a.depth, "batch_size": a.batch_size, **keys}
        run_concurrent(a.concurrent, a, config(a, **keys), run, rt.device.type, results["concurrent"], after_each=save)
        save()


def print_eval(r: dict) -> None:
    print(f"eval     ResNet-{r['depth']}: {r['images_per_s']:.1f} img/s; peak memory "
          f"{r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']})", flush=True)


def print_sd(r: dict) -> None:
    c, s = r["runs"]["pL=1.0"], r["runs"]["pL=0.5"]
    print(f"sd       ResNet-{r['depth']} batch {r['batch_size']}: pL=1.0 {c['step_s_median']:.3f} s/step, "
          f"pL=0.5 {r['survival']} {s['step_s_median']:.3f} s/step: ratio {r['ratio_sd_over_constant']:.3f} "
          f"(median of paired repeats {r['ratio_paired_median']:.3f}) "
          f"(theory {r['theory_expected_compute']:.3f}; blocks run in the timed steps "
          f"{r['theory_for_timed_gates']:.3f}); peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB "
          f"({r['peak_memory_kind']})", flush=True)
