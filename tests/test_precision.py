"""The precision setting: resolved per device, applied to training and evaluation, recorded."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from sdrun.config import ConfigError
from sdrun.engine.runtime import autocast, device_info, resolve_precision, resolve_runtime
from sdrun.launch.app import train
from tests.conftest import TINY, compose_cfg, global_state_kept, sdrun_main

CPU = torch.device("cpu")


def rt_for(**settings):
    cfg = {"device": "cpu", "precision": "auto", "eval_precision": "same", "channels_last": "auto",
           "deterministic": False, **settings}
    from sdrun.config import Toggle
    cfg["channels_last"] = Toggle(cfg["channels_last"])
    return resolve_runtime(OmegaConf.create(cfg))


def test_auto_is_fp32_on_the_cpu_and_tf32_is_refused_there():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "tf32"  # resolution only, no GPU touched
    assert resolve_precision("same", CPU, "bf16") == "bf16"
    with pytest.raises(ConfigError, match="precision=tf32 is a CUDA tensor-core mode"):
        resolve_precision("tf32", CPU)
    rt = rt_for(precision="bf16", eval_precision="fp32")
    assert (rt.precision, rt.eval_precision) == ("bf16", "fp32")
    assert rt_for().precision == rt_for().eval_precision == "fp32"


def test_autocast_follows_the_training_and_the_evaluation_precision():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    rt = rt_for(precision="bf16", eval_precision="fp32")
    with autocast(rt):
        assert lin(x).dtype == torch.bfloat16
    with autocast(rt, eval=True):
        assert lin(x).dtype == torch.float32
    rt = rt_for(precision="fp32", eval_precision="bf16")
    with autocast(rt):
        assert lin(x).dtype == torch.float32
    with autocast(rt, eval=True):
        assert lin(x).dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_records_its_resolved_precision_and_hardware(tmp_path, precision):
    cfg = compose_cfg(*TINY, "device=cpu", f"precision={precision}")
    results = train(cfg, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["precision"] == on_disk["eval_precision"] == precision
    assert on_disk["config"]["precision"] == precision
    assert on_disk["hardware"]["type"] == "cpu" and on_disk["hardware"]["count"] >= 1
    assert on_disk["fp32_math"] is None  # TF32 flags only matter (and are only set) on CUDA
    assert torch.isfinite(torch.tensor(results["final_test_error_pct"]))
    assert "cudnn" in on_disk["versions"]


def test_device_info_on_the_cpu():
    info = device_info(CPU)
    assert info["type"] == "cpu" and info["name"] and info["count"] >= 1


def test_the_old_bf16_key_is_an_unknown_key_on_one_line(tmp_path):
    """bf16= (before the precision setting) is gone: Hydra's own unknown-key error, on one line."""
    r = sdrun_main("train", *TINY, "bf16=on", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sdrun train: error:") and "bf16" in err, err
    assert not any(tmp_path.iterdir())  # nothing was created

def test_deterministic_algorithms_are_set_both_ways_in_one_process():
    """A process that trains twice (tests, bench) must not inherit the last run's flag; a fresh
    process with the flag off skips torch's setter (it imports torch._inductor)."""
    with global_state_kept():
        resolve_runtime(compose_cfg(*TINY, "device=cpu", "deterministic=true"))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        resolve_runtime(compose_cfg(*TINY, "device=cpu"))
        assert not torch.are_deterministic_algorithms_enabled()
