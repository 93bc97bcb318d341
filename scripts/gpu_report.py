"""The reports of a GPU call, from what its script has finished so far.

--call acceptance (scripts/gpu_acceptance.sh): gpu_report.json and gpu_report.md from the work
folder's steps.tsv, pytest.xml and pytest_compile.xml, bench_<precision>.json,
speed_graphs.json, runs/*/metrics.jsonl and results.json.
--call speed (scripts/gpu_speed.sh): speed_report.json and speed_report.md from steps.tsv,
pytest_compile.xml, bench_compile.json and bench_concurrent.json.

Called after every step: both reports are rewritten (atomically), so a call cut short still
leaves every finished figure behind. Parts that are missing are reported as missing, never
guessed; a bench killed mid-section leaves its partial figures, marked as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

from sdrun.paper import CIFAR_EPOCHS as PAPER_EPOCHS
from sdrun.paper import CIFAR_TRAIN_IMAGES
from sdrun.rundir import METRICS, RESULTS, read_jsonl
PRECISIONS = ("tf32", "bf16", "fp32")
OPTIONAL_STEPS = {"compile"}  # call 1 runs it only in time the others leave: not needed for "complete"


def environment(work: Path, mode: str) -> dict:
    """GPU, driver, versions: measured once (importing torch costs seconds) and cached."""
    cached = work / "env.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import torch

    from sdrun.engine.runtime import device_info, software_versions

    device = torch.device("cuda" if mode == "gpu" and torch.cuda.is_available() else "cpu")
    env = {"mode": mode, "hardware": device_info(device), "versions": software_versions(),
           "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    cached.write_text(json.dumps(env, indent=2))
    return env


def bundle_stamp(path: Path | None) -> dict | None:
    """gpu_bundle/STAMP (scripts/gpu_bundle.sh): commit, dirty flag, source hash of the wheel."""
    if path is None or not path.is_file():
        return None
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def steps(work: Path) -> list[dict]:
    """steps.tsv: name, exit (-1: out of time, -2: skipped with the note's reason), ms, the limit
    it ran under, note, the plan's limit (seconds, or "rest" for the elastic step)."""
    out = []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, ms, limit, *rest = line.split("\t")
        rc, note, plan = int(rc), (rest[0] if rest else ""), (rest[1] if len(rest) > 1 else "")
        status = ("ok" if rc == 0 else "timed out" if rc in (124, 137) else "skipped: out of time" if rc == -1
                  else (note or "skipped") if rc == -2 else "failed")
        out.append({"step": name, "exit": rc, "seconds": int(ms) / 1000, "limit_s": int(limit),
                    "plan_limit_s": int(plan) if plan.isdigit() else plan, "status": status})
    return out


def pytest_results(work: Path, junit: str, step: str) -> dict | None:
    """A pytest step's junit file; the step's -v log (STEP.log) if its time limit kept pytest
    from writing one."""
    path = work / junit
    if not path.is_file():
        return pytest_log(work / f"{step}.log")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"unreadable junit xml: {e}"}
    cases = []
    for case in root.iter("testcase"):
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").splitlines()[0][:300] if child.get("message") else ""
        cases.append({"test": f"{Path(case.get('classname', '')).name.rsplit('.', 1)[-1]}::{case.get('name')}",
                      "status": status, "seconds": float(case.get("time") or 0), "message": message})
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": cases}


def pytest_log(path: Path) -> dict | None:
    """pytest -v's lines 'tests/test_cuda.py::NAME PASSED': what finished before a timeout."""
    if not path.is_file():
        return None
    cases = []
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^\S*?(\w+)\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", line)
        if m:
            cases.append({"test": f"{m.group(1)}::{m.group(2)}", "status": m.group(3).lower(),
                          "seconds": 0.0, "message": ""})
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": cases, "note": "from pytest's log: it did not finish (no junit file)"}


def theory_ratio(depth: int, p_last: float = 0.5) -> float:
    """Expected fraction of residual compute with linear decay: sum_l p_l / L."""
    blocks = (depth - 2) // 2
    return sum(1 - (l / blocks) * (1 - p_last) for l in range(1, blocks + 1)) / blocks


def projected_h(images_per_s: float) -> float:
    return PAPER_EPOCHS * CIFAR_TRAIN_IMAGES / images_per_s / 3600


def bench_results(work: Path) -> dict:
    """bench_<precision>.json of call 1: the eager `sd` section (or an older report's `compile`)."""
    out = {}
    for precision in PRECISIONS:
        path = work / f"bench_{precision}.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        res, entry = report["results"], {"file": path.name, "wall_time_s": report.get("wall_time_s")}
        if "compile" in res and "partial" not in res["compile"]:
            c = res["compile"]
            runs = c["runs"]
            entry.update(depth=c["depth"], warmup_and_compile_s=c["warmup_and_compile_s"],
                         peak_memory_mib=c["peak_memory_bytes"] / 2**20, peak_memory_kind=c["peak_memory_kind"],
                         runs={name: {"images_per_s": r["images_per_s"], "step_ms": 1000 * r["step_s_median"],
                                      "projected_500_epochs_h": r["projected_500_epochs_h"]}
                               for name, r in runs.items()},
                         sd_ratio_eager=runs["eager pL=0.5"]["step_s_median"] / runs["eager pL=1.0"]["step_s_median"],
                         sd_ratio_compiled=c["ratio_sd_over_constant_compiled"],
                         speedup_compiled_pL1=c["speedup_compiled_pL=1.0"],
                         speedup_compiled_pL05=c["speedup_compiled_pL=0.5"])
        if "sd" in res and "runs" in res["sd"]:  # finished, or partial after a timed repeat
            s = res["sd"]
            entry.update(depth=s["depth"], peak_memory_mib=s["peak_memory_bytes"] / 2**20,
                         peak_memory_kind=s["peak_memory_kind"], sd_ratio_eager=s["ratio_sd_over_constant"],
                         sd_ratio_paired=s["ratio_paired_median"], blocks_run=s["theory_for_timed_gates"],
                         runs={f"eager {name}": {
                             "images_per_s": r["images_per_s"], "step_ms": 1000 * r["step_s_median"],
                             "projected_500_epochs_h": projected_h(r["images_per_s"])}
                             for name, r in s["runs"].items()})
            if "partial" in s:
                entry["partial"] = s["partial"]
        if "depth" not in entry:  # killed before its first timed repeat: no figure (its step says why)
            continue
        entry["sd_ratio_theory"] = theory_ratio(entry["depth"])
        out[precision] = entry
    return out


def speed_results(path: Path) -> dict | None:
    """`sdrun bench --speed MODES`: per mode ms/step, images/s, SD ratio, 500-epoch projection."""
    if not path.is_file():
        return None
    s = json.loads(path.read_text())["results"].get("speed")
    if s is None:
        return {"partial": "killed before its section started"}
    entry = {"file": path.name, "warmup_s": s.get("warmup_s"), "batch_size": s.get("batch_size")}
    if "partial" in s:
        entry["partial"] = s["partial"]
    if "modes" in s:
        entry.update(depth=s["depth"], peak_memory_mib=s["peak_memory_bytes"] / 2**20,
                     warmup_and_capture_s=s["warmup_and_capture_s"],
                     modes={mode: {"step_ms_pL1": 1000 * m["step_s_pL=1.0"], "step_ms_pL05": 1000 * m["step_s_pL=0.5"],
                                   "images_per_s_pL05": m["images_per_s_pL=0.5"],
                                   "images_per_s_pL1": m["images_per_s_pL=1.0"],
                                   "sd_ratio": m["ratio_sd_over_constant"],
                                   "projected_500_epochs_h_pL05": m["projected_500_epochs_min_pL=0.5"] / 60}
                            for mode, m in s["modes"].items()})
        eager = entry["modes"].get("eager")
        for mode, m in entry["modes"].items():
            if eager and mode != "eager":
                m["speedup_over_eager_pL05"] = eager["step_ms_pL05"] / m["step_ms_pL05"]
    return entry


def concurrent_results(path: Path) -> dict | None:
    """`sdrun bench --concurrent KS`: per K the aggregate images/s and the projected hours."""
    if not path.is_file():
        return None
    c = json.loads(path.read_text())["results"].get("concurrent")
    if not c or not c.get("runs"):
        return {"runs": {}, "note": "no K finished"}
    return {"settings": c["settings"], "best_k": c.get("best_k"),
            "runs": {k: {"aggregate_images_per_s": r["aggregate_images_per_s"],
                         "per_process_images_per_s": [p["images_per_s"] for p in r["processes"]],
                         "speedup_over_one": r.get("speedup_over_one"),
                         "projected_500_epochs_one_run_h": r["projected_500_epochs_one_run_h"],
                         "table1_cifar10_6_runs_h": r["table1_cifar10_6_runs_h"],
                         "peak_memory_mib_per_process": [p["peak_memory_bytes"] / 2**20 if p.get("peak_memory_bytes")
                                                         else None for p in r["processes"]]}
                     for k, r in c["runs"].items()}}


def lr_segments(lrs: list[float]) -> list[list]:
    """Consecutive (lr, epochs) runs of a list of per-epoch lrs."""
    out: list[list] = []
    for lr in lrs:
        lr = round(lr, 12)
        if out and out[-1][0] == lr:
            out[-1][1] += 1
        else:
            out.append([lr, 1])
    return out


def planned_schedule(run: Path) -> list[list] | None:
    """The epochs per lr the run's own resolved config asks for (sdrun.engine.schedule, the code the
    trainer uses), from Hydra's .hydra/config.yaml written when the run started."""
    path = run / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        from sdrun.engine.schedule import epochs_per_lr

        cfg = yaml.safe_load(path.read_text())
        optim = SimpleNamespace(**{k: cfg["optim"][k] for k in ("lr", "gamma", "milestones", "warmup_epochs",
                                                                 "warmup_lr", "epoch_base")})
        return [list(seg) for seg in epochs_per_lr(int(cfg["epochs"]), optim)]
    except Exception:  # an interpolation or a key this reader does not know: say nothing rather than guess
        return None


def fmt_segments(segments: list[list] | None) -> str:
    return "/".join(str(n) for _, n in segments) + " epochs at lr " + "/".join(f"{lr:g}" for lr, _ in segments) \
        if segments else "unknown"


def train_results(work: Path, settings: dict[str, str]) -> dict:
    out = {}
    for name, args in settings.items():
        run = work / "runs" / name
        entry = {"overrides": args, "schedule_planned": planned_schedule(run)}
        rows = read_jsonl(run / METRICS)  # a run cut short may leave a torn last line: dropped
        entry["epochs_done"] = len(rows)
        entry["schedule_run"] = lr_segments([r["lr"] for r in rows]) if rows else None
        if rows:
            secs = [r["epoch_train_time_s"] for r in rows]
            seen = round(rows[-1]["images_per_s"] * rows[-1]["epoch_train_time_s"])
            steady = secs[1:] or secs  # the first epoch also pays cudnn.benchmark's search
            per_image = statistics.median(steady) / seen
            entry.update(train_images_per_epoch=seen, epoch_train_s=secs, epoch_train_s_steady_median=statistics.median(steady),
                         images_per_s_steady=1 / per_image,
                         projected_500_epochs_45k_h=per_image * CIFAR_TRAIN_IMAGES * PAPER_EPOCHS / 3600,
                         test_error_pct=[r["test_error_pct"] for r in rows],
                         train_loss=[r["train_loss"] for r in rows])
        results_path = run / RESULTS
        if results_path.is_file():
            r = json.loads(results_path.read_text())
            entry.update(finished=True, precision=r.get("precision"), eval_precision=r.get("eval_precision"),
                         final_test_error_pct=r["final_test_error_pct"],
                         test_error_at_best_val_pct=r["test_error_at_best_val_pct"],
                         wall_time_s=r["wall_time_s"], hardware=r.get("hardware"), fp32_math=r.get("fp32_math"))
        else:
            entry["finished"] = False
        out[name] = entry
    return out


# ---------------------------------------------------------------- markdown

def md_header(rep: dict, title: str, script: str) -> list[str]:
    env, hw = rep["environment"], rep["environment"]["hardware"]
    v = env["versions"]
    stamp = rep.get("bundle_stamp")
    lines = [f"# {title} ({rep['mode']})", "",
             f"Written by {script} after {rep['elapsed_s']} s; "
             f"{'complete' if rep['complete'] else 'INCOMPLETE (a step is missing, failed or timed out)'}.", "",
             f"- device: {hw.get('name')} x{hw.get('count')} ({hw.get('type')}), driver {hw.get('driver')}, "
             f"capability {hw.get('capability')}; nvidia-smi: {env.get('nvidia_smi')}",
             f"- torch {v.get('torch')}, CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}, python {v.get('python')}, "
             f"sdrun {v.get('sdrun')}, hydra {v.get('hydra')}, omegaconf {v.get('omegaconf')}"]
    if stamp:
        lines.append(f"- bundle: sdrun wheel from commit {stamp.get('commit')} "
                     f"({'with uncommitted changes' if stamp.get('dirty') == '1' else 'clean'}), "
                     f"source_sha256 {stamp.get('source_sha256', '')[:12]}, built {stamp.get('built')}")
    lines += ["", "## Steps", "", "| step | status | seconds | limit (plan) |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['step']} | {s['status']} (exit {s['exit']}) | {s['seconds']:.1f} | {s['limit_s']} "
              f"({s['plan_limit_s']}) |" for s in rep["steps"]]
    return lines


def md_pytest(title: str, pt: dict | None) -> list[str]:
    lines = ["", f"## {title}", ""]
    if pt is None:
        return lines + ["not run"]
    if "error" in pt:
        return lines + [pt["error"]]
    lines.append(", ".join(f"{n} {k}" for k, n in pt["counts"].items()) + (f" ({pt['note']})" if "note" in pt else ""))
    lines += ["", "| test | status | seconds | message |", "| --- | --- | --- | --- |"]
    lines += [f"| {c['test']} | {c['status']} | {c['seconds']:.1f} | {c['message'].replace('|', '/')} |"
              for c in pt["tests"]]
    return lines


def md_speed(title: str, sp: dict | None) -> list[str]:
    lines = ["", f"## {title}", ""]
    if sp is None:
        return lines + ["not run"]
    if "partial" in sp:
        lines += [f"PARTIAL: {sp['partial']}" + (f"; warm-up seconds per configuration: {sp['warmup_s']}"
                                                  if sp.get("warmup_s") else ""), ""]
    if "modes" not in sp:
        return lines
    lines += [f"ResNet-{sp['depth']}, batch {sp['batch_size']}; warm-up (compile / capture) "
              f"{sp['warmup_and_capture_s']:.1f} s; peak memory {sp['peak_memory_mib']:.0f} MiB", "",
              "| mode | ms/step pL=1.0 | ms/step pL=0.5 | images/s pL=0.5 | SD/constant | speed-up over eager | "
              "500 CIFAR epochs pL=0.5 (h) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode, m in sp["modes"].items():
        up = f"{m['speedup_over_eager_pL05']:.2f}x" if "speedup_over_eager_pL05" in m else "-"
        lines.append(f"| {mode} | {m['step_ms_pL1']:.2f} | {m['step_ms_pL05']:.2f} | {m['images_per_s_pL05']:.0f} | "
                     f"{m['sd_ratio']:.3f} | {up} | {m['projected_500_epochs_h_pL05']:.2f} |")
    return lines


def markdown(rep: dict) -> str:
    lines = md_header(rep, "sdrun GPU acceptance report", "scripts/gpu_acceptance.sh")
    lines += md_pytest("CUDA tests (pytest -m cuda -k 'not compile': tests/test_cuda.py, tests/test_cuda_speed.py)",
                       rep["pytest"])
    lines += ["", "## sdrun bench, eager, per precision (the embedded digits through the run's own data path, fidelity=reference)", ""]
    if not rep["bench"]:
        lines.append("not run")
    else:
        lines += ["| precision | configuration | images/s | ms/step | 500 CIFAR epochs (h) |",
                  "| --- | --- | --- | --- | --- |"]
        for p, b in rep["bench"].items():
            for name, r in b["runs"].items():
                lines.append(f"| {p} | ResNet-{b['depth']} {name} | {r['images_per_s']:.0f} | {r['step_ms']:.2f} | "
                             f"{r['projected_500_epochs_h']:.2f} |")
        lines += ["", "| precision | SD step ratio eager | SD step ratio compiled | theory | peak memory (MiB) | note |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for p, b in rep["bench"].items():
            comp = f"{b['sd_ratio_compiled']:.3f}" if "sd_ratio_compiled" in b else "-"
            lines.append(f"| {p} | {b['sd_ratio_eager']:.3f} | {comp} | {b['sd_ratio_theory']:.3f} | "
                         f"{b['peak_memory_mib']:.0f} ({b['peak_memory_kind']}) | "
                         f"{('PARTIAL: ' + b['partial']) if 'partial' in b else ''} |")
    lines += md_speed("sdrun bench --speed eager,graphs", rep["graphs"])
    lines += ["", "## sdrun train on the real CIFAR-10 images", ""]
    pred = rep["prediction"]
    for name, t in rep["train"].items():
        lines.append(f"### {name}: `{t['overrides']}`")
        lines.append("")
        lines.append(f"- schedule: the run's config asks for {fmt_segments(t['schedule_planned'])}; "
                     f"the epochs it ran had {fmt_segments(t['schedule_run'])} (metrics.jsonl's lr)")
        if not t["epochs_done"]:
            lines += ["- no epoch finished", ""]
            continue
        lines.append(f"- {t['epochs_done']} epochs of {t['train_images_per_epoch']} training images; seconds per "
                     f"epoch {', '.join(f'{s:.2f}' for s in t['epoch_train_s'])} (steady median "
                     f"{t['epoch_train_s_steady_median']:.2f} s, {t['images_per_s_steady']:.0f} images/s); "
                     f"projected 500 epochs of 45k images: {t['projected_500_epochs_45k_h']:.2f} h")
        lines.append(f"- test error by epoch (%): {', '.join(f'{e:.2f}' for e in t['test_error_pct'])}")
        if t["finished"]:
            lines.append(f"- finished: precision {t['precision']} (eval {t['eval_precision']}), final test error "
                         f"{t['final_test_error_pct']:.2f} %, at best val {t['test_error_at_best_val_pct']:.2f} %")
        if name == "b_short_schedule":
            lines.append(f"- predicted before the run: {pred['final_test_error_pct']} % (held if within "
                         f"{pred['low']}-{pred['high']} %): {pred.get('verdict', 'not run to the end')}")
        lines.append("")
    lines += md_pytest("Compile tests (pytest -m cuda -k compile; only in the time the steps above left)",
                       rep["compile"])
    return "\n".join(lines) + "\n"


def speed_markdown(rep: dict) -> str:
    lines = md_header(rep, "sdrun GPU speed report", "scripts/gpu_speed.sh")
    c = rep["concurrent"]
    lines += ["", "## K concurrent training processes on the one device (sdrun bench --concurrent)", ""]
    if c is None or not c["runs"]:
        lines.append("not run" if c is None else c["note"])
    else:
        s = c["settings"]
        lines += [f"ResNet-{s['depth']}, batch {s['batch_size']}, p_L {s['pL']}, speed={s['speed']}, "
                  f"a {s['window_s']} s window; best K = {c['best_k']}", "",
                  "| K | aggregate images/s | per process | over K=1 | one run's 500 epochs (h) | "
                  "Table 1's 6 CIFAR-10 runs (h) |", "| --- | --- | --- | --- | --- | --- |"]
        for k, r in c["runs"].items():
            up = f"{r['speedup_over_one']:.2f}x" if r["speedup_over_one"] else "-"
            lines.append(f"| {k} | {r['aggregate_images_per_s']:.0f} | "
                         f"{', '.join(f'{x:.0f}' for x in r['per_process_images_per_s'])} | {up} | "
                         f"{r['projected_500_epochs_one_run_h']:.2f} | {r['table1_cifar10_6_runs_h']:.2f} |")
    lines += md_speed("Eager vs per-branch compile (sdrun bench --speed eager,compile)", rep["compile_bench"])
    lines += md_pytest("Compile tests (pytest -m cuda -k compile)", rep["compile_tests"])
    lines += ["", "## 500-epoch projections (training only, 45k CIFAR images per epoch)", ""]
    lines += [f"- {what}: {h:.2f} h" for what, h in rep["projections_h"].items()] or ["none measured"]
    return "\n".join(lines) + "\n"


def write(out: Path, files: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def required_ok(rep: dict) -> bool:
    """Every step ran to its end with exit 0, or was skipped for lack of CUDA in the CPU smoke
    mode; the optional steps (OPTIONAL_STEPS) may also be skipped for lack of time."""
    def fine(s: dict) -> bool:
        if s["status"] == "ok":
            return True
        if rep["mode"] == "cpu-smoke" and s["status"].startswith("skipped:"):
            return True  # needs CUDA, or the smoke mode's own interpreter instead of the wheels
        return s["step"] in OPTIONAL_STEPS and s["status"] == "skipped: out of time"
    return all(fine(s) for s in rep["steps"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--call", choices=("acceptance", "speed"), default="acceptance")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=("gpu", "cpu-smoke"), required=True)
    p.add_argument("--predicted", type=float, nargs=3, metavar=("ERROR", "LOW", "HIGH"))
    p.add_argument("--elapsed", type=int, default=0)
    p.add_argument("--train-a", default="")
    p.add_argument("--train-b", default="")
    p.add_argument("--stamp", type=Path, default=None, help="gpu_bundle/STAMP (GPU mode)")
    p.add_argument("--expect-steps", default="", help="the plan's steps, comma-separated: missing ones make it incomplete")
    a = p.parse_args()
    rep = {"mode": a.mode, "elapsed_s": a.elapsed, "environment": environment(a.work, a.mode),
           "bundle_stamp": bundle_stamp(a.stamp), "steps": steps(a.work)}
    names = {s["step"] for s in rep["steps"]}
    expected = {n for n in a.expect_steps.split(",") if n}
    if a.call == "speed":
        rep.update(concurrent=concurrent_results(a.work / "bench_concurrent.json"),
                   compile_bench=speed_results(a.work / "bench_compile.json"),
                   compile_tests=pytest_results(a.work, "pytest_compile.xml", "compile_tests"))
        proj = {}
        for mode, m in ((rep["compile_bench"] or {}).get("modes") or {}).items():
            proj[f"one run, speed={mode}, p_L 0.5 (bench --speed)"] = m["projected_500_epochs_h_pL05"]
        for k, r in ((rep["concurrent"] or {}).get("runs") or {}).items():
            proj[f"one run of {k} sharing the GPU (bench --concurrent)"] = r["projected_500_epochs_one_run_h"]
            proj[f"Table 1's 6 CIFAR-10 runs, {k} at a time"] = r["table1_cifar10_6_runs_h"]
        rep["projections_h"] = proj
        rep["complete"] = required_ok(rep) and expected <= names
        write(a.out, {"speed_report.json": json.dumps(rep, indent=2) + "\n", "speed_report.md": speed_markdown(rep)})
        return
    if a.predicted is None:
        p.error("--call acceptance needs --predicted ERROR LOW HIGH")
    rep.update(pytest=pytest_results(a.work, "pytest.xml", "pytest"), bench=bench_results(a.work),
               graphs=speed_results(a.work / "speed_graphs.json"),
               train=train_results(a.work, {"a_epochs": a.train_a, "b_short_schedule": a.train_b}),
               compile=pytest_results(a.work, "pytest_compile.xml", "compile"))
    err, low, high = a.predicted
    pred = {"final_test_error_pct": err, "low": low, "high": high}
    b = rep["train"]["b_short_schedule"]
    if b.get("finished"):
        measured = b["final_test_error_pct"]
        pred["measured"] = measured
        pred["verdict"] = (f"measured {measured:.2f} %: " + ("inside" if low <= measured <= high else "OUTSIDE")
                           + " the predicted range")
    rep["prediction"] = pred
    rep["complete"] = (required_ok(rep) and (expected or {"pytest", "train_a", "train_b"}) <= names
                       and all(t.get("finished") for t in rep["train"].values()))
    write(a.out, {"gpu_report.json": json.dumps(rep, indent=2) + "\n", "gpu_report.md": markdown(rep)})


if __name__ == "__main__":
    main()
