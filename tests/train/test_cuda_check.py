"""The CUDA check: which driver each torch build needs, how the host's driver is read, and what a run without CUDA
is told (by the training image's entrypoint and by ``python -m train``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from loraship.envsettings import SettingsError, settings_rows
from train import cuda_check
from train.cuda_check import (
    PROC_DRIVER_VERSION, driver_from_proc, flavour_of, host_driver_version, newest_flavour_for, no_cuda_message,
    parse_version, runs_on, torch_reason,
)
from train.settings import TrainSettings, load_train_settings

REPO = Path(__file__).resolve().parents[2]
NO_DOTENV = REPO / "tests" / "train" / "no-such.env"
HAS_DRIVER = shutil.which("nvidia-smi") is not None or PROC_DRIVER_VERSION.exists()
PROC_TEXT = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.124.06  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Wed Feb 26 01:36:21 UTC 2025\n"
    "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n"
)


@pytest.fixture
def clean_env(monkeypatch):
    """No train variable and no image flavour from the outer environment; the repo as working folder."""
    for var, *_ in settings_rows(TrainSettings):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(cuda_check.FLAVOUR_ENV, raising=False)
    monkeypatch.chdir(REPO)
    return monkeypatch


def fake_nvidia_smi(folder: Path, script: str) -> str:
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n", encoding="utf-8")
    (folder / "nvidia-smi").chmod(0o755)
    return str(folder)


# --- which driver each build needs ------------------------------------------------------------------------------

def test_driver_versions_compare_part_by_part():
    assert parse_version("535.104.05") == (535, 104, 5)
    assert parse_version("535.104.05") > parse_version("535.86.10")


def test_cuda_13_builds_need_the_580_driver_branch():
    assert runs_on("580.65.06", "cu130")
    assert not runs_on("575.57.08", "cu130")


def test_cuda_12_builds_run_from_the_525_driver_branch():
    assert runs_on("525.60.13", "cu126") and runs_on("535.104.05", "cu128")
    assert not runs_on("520.61.05", "cu128")


def test_the_newest_build_a_driver_runs_is_chosen():
    assert newest_flavour_for("535.104.05") == "cu128"
    assert newest_flavour_for("590.44.01") == "cu130"


def test_a_driver_older_than_every_build_gets_none():
    assert newest_flavour_for("470.82.01") is None


def test_torchs_cuda_version_names_its_build():
    assert (flavour_of("12.6"), flavour_of("12.8"), flavour_of("13.0")) == ("cu126", "cu128", "cu130")
    assert flavour_of(None) is None  # a CPU build


# --- reading the host's driver -----------------------------------------------------------------------------------

def test_nvidia_smi_gives_the_driver_version(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, 'printf "535.104.05\\n535.104.05\\n"'))  # two GPUs
    assert host_driver_version(tmp_path / "no-proc-file") == "535.104.05"


def test_without_nvidia_smi_the_kernel_module_says(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "version").write_text(PROC_TEXT, encoding="utf-8")
    assert host_driver_version(tmp_path / "version") == "570.124.06"


def test_a_failing_nvidia_smi_falls_back_to_the_kernel_module(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, 'echo "NVIDIA-SMI has failed" >&2; exit 9'))
    (tmp_path / "version").write_text(PROC_TEXT, encoding="utf-8")
    assert host_driver_version(tmp_path / "version") == "570.124.06"


def test_neither_means_no_driver(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert host_driver_version(tmp_path / "no-proc-file") is None


def test_the_proc_file_of_the_proprietary_module_reads_too():
    line = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    assert driver_from_proc(line) == "535.104.05"


# --- what a run without CUDA is told -----------------------------------------------------------------------------

def test_an_old_driver_is_told_the_build_that_runs_on_it():
    message = no_cuda_message("535.104.05", "cu130", "The NVIDIA driver on your system is too old")
    assert "the NVIDIA driver is 535.104.05 and this torch (TORCH_CUDA=cu130) needs >= 580" in message
    assert "--build-arg TORCH_CUDA=cu128" in message
    assert "update the driver to >= 580" in message


def test_a_driver_too_old_for_every_build_is_told_to_update():
    message = no_cuda_message("470.82.01", "cu130", None)
    assert message.endswith("no TORCH_CUDA flavour runs on it: update the driver to >= 580")


def test_no_driver_is_told_to_run_with_gpus_all():
    message = no_cuda_message(None, "cu130", "Found no NVIDIA driver on your system.")
    assert "--gpus all" in message and "NVIDIA Container Toolkit" in message


def test_a_new_enough_driver_hears_torchs_own_reason():
    message = no_cuda_message("580.65.06", "cu130", "CUDA unknown error.")
    assert "580.65.06 is new enough for this torch (TORCH_CUDA=cu130 needs >= 580): CUDA unknown error;" in message


def test_a_cpu_build_of_torch_is_pointed_at_a_cuda_build():
    message = no_cuda_message("535.104.05", None, "torch 2.13.0+cpu is a CPU build")
    assert "torch 2.13.0+cpu is a CPU build" in message
    assert "https://download.pytorch.org/whl/cu128" in message


def test_torchs_warning_is_cut_to_its_reason():
    warning = ("CUDA initialization: The NVIDIA driver on your system is too old (found version 12020). "
               "(Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:109.)")
    assert torch_reason(warning) == "The NVIDIA driver on your system is too old (found version 12020)."


# --- python -m train ----------------------------------------------------------------------------------------------

def test_a_gpu_recipe_without_cuda_is_refused_with_the_drivers_fix_not_the_optimizers(clean_env):
    clean_env.setenv("RECIPE", "llama3-8b-finetome")  # sets OPTIMIZER=adamw_8bit, a CUDA-only optimizer
    with pytest.raises(SettingsError) as err:
        load_train_settings(NO_DOTENV, cuda=False)
    (problem,) = err.value.problems
    assert problem.startswith("RECIPE='llama3-8b-finetome': needs a CUDA GPU; CUDA does not start")


@pytest.mark.skipif(HAS_DRIVER, reason="this machine has an NVIDIA driver")
def test_python_m_train_refuses_a_gpu_recipe_on_this_cpu_machine_before_any_download(clean_env):
    from train import run

    started = []
    clean_env.setattr(run, "train", lambda *args, **kwargs: started.append(args))
    from train.__main__ import main

    result = CliRunner().invoke(main, ["--env-file", str(NO_DOTENV)], env={"RECIPE": "llama3-8b-finetome"})
    assert result.exit_code == 2
    assert "error: RECIPE='llama3-8b-finetome': needs a CUDA GPU; CUDA does not start" in result.output
    assert "--gpus all" in result.output
    assert started == []


def test_the_demo_recipe_passes_the_check_on_a_cpu(clean_env):
    clean_env.setenv("RECIPE", "demo")
    assert load_train_settings(NO_DOTENV, cuda=False).recipe == "demo"


def test_a_run_without_a_recipe_passes_the_check_on_a_cpu(clean_env):
    assert load_train_settings(NO_DOTENV, cuda=False).recipe is None


def test_the_demo_recipe_is_judged_without_importing_torch(tmp_path):
    # Looking for CUDA imports torch (seconds); the demo, made for a CPU, never looks.
    script = (
        "import json, sys\n"
        "from train.settings import load_train_settings\n"
        f"load_train_settings({str(NO_DOTENV)!r})\n"
        "print(json.dumps('torch' in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPTIMIZER", "NUM_GPUS")}
    env.update(RECIPE="demo", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) is False
