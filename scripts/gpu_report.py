"""gpu_report.json and gpu_report.md from what scripts/gpu_acceptance.sh has finished so far.

Called after every step of the acceptance run: it reads the work folder (steps.tsv,
pytest.xml, bench_<precision>.json, runs/*/metrics.jsonl and results.json) and rewrites
both reports, so a run cut short still leaves every finished figure behind. Parts that
are missing are reported as missing, never guessed.
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

CIFAR_TRAIN_IMAGES = 45_000  # the paper's training split (50k less 5k validation)
PAPER_EPOCHS = 500


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


def steps(work: Path) -> list[dict]:
    out = []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, ms, limit = line.split("\t")
        rc = int(rc)
        status = ("ok" if rc == 0 else "timed out" if rc in (124, 137) else "skipped: out of time" if rc == -1
                  else "failed")
        out.append({"step": name, "exit": rc, "seconds": int(ms) / 1000, "limit_s": int(limit), "status": status})
    return out


def pytest_results(work: Path) -> dict | None:
    path = work / "pytest.xml"
    if not path.is_file():
        return pytest_log(work / "pytest.log")
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
        cases.append({"test": case.get("name"), "status": status, "seconds": float(case.get("time") or 0),
                      "message": message})
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": cases}


def pytest_log(path: Path) -> dict | None:
    """pytest -v's lines 'tests/test_cuda.py::NAME PASSED': what finished before a timeout."""
    if not path.is_file():
        return None
    cases = []
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^\S*::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", line)
        if m:
            cases.append({"test": m.group(1), "status": m.group(2).lower(),
                          "seconds": 0.0, "message": ""})
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": cases, "note": "from pytest's log: it did not finish (no junit file)"}


def theory_ratio(depth: int, p_last: float = 0.5) -> float:
    """Expected fraction of residual compute with linear decay: sum_l p_l / L."""
    blocks = (depth - 2) // 2
    return sum(1 - (l / blocks) * (1 - p_last) for l in range(1, blocks + 1)) / blocks


def bench_results(work: Path) -> dict:
    out = {}
    for path in sorted(work.glob("bench_*.json")):
        report = json.loads(path.read_text())
        precision = report["environment"].get("precision", path.stem.split("_", 1)[1])
        res, entry = report["results"], {"file": path.name, "wall_time_s": report.get("wall_time_s")}
        if "compile" in res:
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
        if "sd" in res:  # the smoke mode's eager-only section
            s = res["sd"]
            entry.update(depth=s["depth"], peak_memory_mib=s["peak_memory_bytes"] / 2**20,
                         peak_memory_kind=s["peak_memory_kind"], sd_ratio_eager=s["ratio_sd_over_constant"],
                         runs={f"eager {name}": {
                             "images_per_s": r["images_per_s"], "step_ms": 1000 * r["step_s_median"],
                             "projected_500_epochs_h": PAPER_EPOCHS * CIFAR_TRAIN_IMAGES / r["images_per_s"] / 3600}
                             for name, r in s["runs"].items()})
        if "depth" in entry:
            entry["sd_ratio_theory"] = theory_ratio(entry["depth"])
        out[precision] = entry
    return out


def train_results(work: Path, settings: dict[str, str]) -> dict:
    out = {}
    for name, args in settings.items():
        run = work / "runs" / name
        entry = {"overrides": args}
        metrics_path = run / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
        entry["epochs_done"] = len(rows)
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
        results_path = run / "results.json"
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


def markdown(rep: dict) -> str:
    env, hw = rep["environment"], rep["environment"]["hardware"]
    v = env["versions"]
    lines = [f"# sdrun GPU acceptance report ({rep['mode']})", "",
             f"Written by scripts/gpu_acceptance.sh after {rep['elapsed_s']} s; "
             f"{'complete' if rep['complete'] else 'INCOMPLETE (a step is missing, failed or timed out)'}.", "",
             f"- device: {hw.get('name')} x{hw.get('count')} ({hw.get('type')}), driver {hw.get('driver')}, "
             f"capability {hw.get('capability')}; nvidia-smi: {env.get('nvidia_smi')}",
             f"- torch {v.get('torch')}, CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}, python {v.get('python')}, "
             f"sdrun {v.get('sdrun')}, hydra {v.get('hydra')}, omegaconf {v.get('omegaconf')}", "",
             "## Steps", "", "| step | status | seconds | limit |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['step']} | {s['status']} (exit {s['exit']}) | {s['seconds']:.1f} | {s['limit_s']} |"
              for s in rep["steps"]]
    lines += ["", "## CUDA tests (pytest -m cuda)", ""]
    pt = rep["pytest"]
    if pt is None:
        lines.append("not run")
    elif "error" in pt:
        lines.append(pt["error"])
    else:
        lines.append(", ".join(f"{n} {k}" for k, n in pt["counts"].items()) + (f" ({pt['note']})" if "note" in pt else ""))
        lines += ["", "| test | status | seconds | message |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['test']} | {c['status']} | {c['seconds']:.1f} | {c['message'].replace('|', '/')} |"
                  for c in pt["tests"]]
    lines += ["", "## sdrun bench (synthetic CIFAR-shaped batches)", ""]
    if not rep["bench"]:
        lines.append("not run")
    else:
        lines += ["| precision | configuration | images/s | ms/step | 500 CIFAR epochs (h) |",
                  "| --- | --- | --- | --- | --- |"]
        for p, b in rep["bench"].items():
            for name, r in b["runs"].items():
                lines.append(f"| {p} | ResNet-{b['depth']} {name} | {r['images_per_s']:.0f} | {r['step_ms']:.2f} | "
                             f"{r['projected_500_epochs_h']:.2f} |")
        lines += ["", "| precision | SD step ratio eager | SD step ratio compiled | theory | peak memory (MiB) |",
                  "| --- | --- | --- | --- | --- |"]
        for p, b in rep["bench"].items():
            comp = f"{b['sd_ratio_compiled']:.3f}" if "sd_ratio_compiled" in b else "-"
            lines.append(f"| {p} | {b['sd_ratio_eager']:.3f} | {comp} | {b['sd_ratio_theory']:.3f} | "
                         f"{b['peak_memory_mib']:.0f} ({b['peak_memory_kind']}) |")
    lines += ["", "## sdrun train on the real CIFAR-10 images", ""]
    pred = rep["prediction"]
    for name, t in rep["train"].items():
        lines.append(f"### {name}: `{t['overrides']}`")
        lines.append("")
        if not t["epochs_done"]:
            lines += ["no epoch finished", ""]
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
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=("gpu", "cpu-smoke"), required=True)
    p.add_argument("--predicted", type=float, nargs=3, metavar=("ERROR", "LOW", "HIGH"), required=True)
    p.add_argument("--elapsed", type=int, default=0)
    p.add_argument("--train-a", default="")
    p.add_argument("--train-b", default="")
    a = p.parse_args()
    rep = {"mode": a.mode, "elapsed_s": a.elapsed, "environment": environment(a.work, a.mode),
           "steps": steps(a.work), "pytest": pytest_results(a.work), "bench": bench_results(a.work),
           "train": train_results(a.work, {"a_epochs": a.train_a, "b_short_schedule": a.train_b})}
    err, low, high = a.predicted
    pred = {"final_test_error_pct": err, "low": low, "high": high}
    b = rep["train"]["b_short_schedule"]
    if b.get("finished"):
        measured = b["final_test_error_pct"]
        pred["measured"] = measured
        pred["verdict"] = (f"measured {measured:.2f} %: " + ("inside" if low <= measured <= high else "OUTSIDE")
                           + " the predicted range")
    rep["prediction"] = pred
    names = {s["step"] for s in rep["steps"]}
    rep["complete"] = (all(s["status"] == "ok" for s in rep["steps"]) and {"pytest", "train_a", "train_b"} <= names
                       and all(t.get("finished") for t in rep["train"].values()))
    a.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_report.json", json.dumps(rep, indent=2) + "\n"), ("gpu_report.md", markdown(rep))):
        tmp = a.out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(a.out / name)


if __name__ == "__main__":
    main()
