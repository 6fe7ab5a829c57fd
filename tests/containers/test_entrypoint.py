"""docker/entrypoint.sh, the training image's entry point, run with a stand-in `python`.

The stand-in records each `python -m STAGE` call with the settings that
decide where the stage reads and writes, and fails when told to, so the tests
see exactly which stages a container would run and with what. The CUDA check
before training runs for real, against a stand-in torch and `nvidia-smi`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.containers import REPO
from train.cuda_check import PROC_DRIVER_VERSION

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"

# `python -m STAGE` is recorded; `python -c CODE` (the entrypoint asking
# train's settings where the run went) and the CUDA check run for real against
# this checkout.
FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-c" ] || [ "$2" = "train.cuda_check" ]; then exec "$REAL_PYTHON" "$@"; fi
exec "$REAL_PYTHON" "$RECORD_STAGE" "$@"
"""

# The host's driver as nvidia-smi reports it; FAKE_DRIVER empty: no driver to talk to.
FAKE_NVIDIA_SMI = """#!/bin/sh
if [ -z "$FAKE_DRIVER" ]; then
    echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
    exit 9
fi
echo "$FAKE_DRIVER"
"""

# torch built for CUDA 13.0 (the image's default TORCH_CUDA): CUDA starts unless
# FAKE_CUDA_ERROR holds the reason torch would give.
FAKE_TORCH = """import os
import warnings

__version__ = "2.13.0"


class version:
    cuda = "13.0"


class cuda:
    @staticmethod
    def is_available():
        error = os.environ.get("FAKE_CUDA_ERROR")
        if error:
            warnings.warn(f"CUDA initialization: {error} (Triggered internally at CUDAFunctions.cpp:109.)")
        return not error
"""
TOO_OLD = "The NVIDIA driver on your system is too old (found version 12020)."
NO_DRIVER = "Found no NVIDIA driver on your system."

RECORD_STAGE = """import json, os, sys
stage = sys.argv[2] if sys.argv[1:2] == ["-m"] else " ".join(sys.argv[1:])
record = {"stage": stage, "args": sys.argv[3:]}
for name in ("ADAPTER", "OUTPUT_DIR", "HUB_REPO", "RECIPE", "HF_TOKEN", "MERGED_REPO"):
    if name in os.environ:
        record[name] = os.environ[name]
with open(os.environ["CALLS"], "a") as fh:
    fh.write(json.dumps(record) + "\\n")
sys.exit(3 if stage in os.environ.get("FAIL_STAGES", "").split(",") else 0)
"""


@pytest.fixture
def container(tmp_path):
    """Runs the entrypoint in a scratch /data with the stand-ins first on PATH; by default CUDA starts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("python", FAKE_PYTHON), ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (bin_dir / name).write_text(script, encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "record_stage.py").write_text(RECORD_STAGE, encoding="utf-8")
    (tmp_path / "stand_ins" / "torch").mkdir(parents=True)
    (tmp_path / "stand_ins" / "torch" / "__init__.py").write_text(FAKE_TORCH, encoding="utf-8")
    data = tmp_path / "data"
    data.mkdir()
    calls = tmp_path / "calls.jsonl"

    def run(*args: str, **env: str):
        environ = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "CALLS": str(calls),
            "HOME": str(tmp_path),
            "REAL_PYTHON": sys.executable,
            "RECORD_STAGE": str(tmp_path / "record_stage.py"),
            "PYTHONPATH": f"{tmp_path / 'stand_ins'}{os.pathsep}{REPO}",
            "HF_HUB_OFFLINE": "1",
            "LORASHIP_TORCH_CUDA": "cu130",
            "FAKE_DRIVER": "580.65.06",
            **env,
        }
        result = subprocess.run(
            ["sh", str(ENTRYPOINT), *args], cwd=data, env=environ, capture_output=True, text=True, timeout=60
        )
        made = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
        calls.unlink(missing_ok=True)
        return result, made

    run.data = data
    return run


def test_without_arguments_it_trains_only(container):
    result, calls = container(RECIPE="llama3-8b-finetome", HUB_REPO="me/adapter")
    assert result.returncode == 0, result.stderr
    assert calls == [{"stage": "train", "args": [], "RECIPE": "llama3-8b-finetome", "HUB_REPO": "me/adapter"}]


def test_export_1_exports_the_fresh_adapter_in_the_same_run(container):
    result, calls = container(RECIPE="r", HUB_REPO="me/adapter", HF_TOKEN="t", EXPORT="1")
    assert result.returncode == 0, result.stderr
    assert [c["stage"] for c in calls] == ["train", "export"]
    export = calls[1]
    assert export["ADAPTER"] == "outputs/train"
    assert export["OUTPUT_DIR"] == "outputs/export"
    assert export["HUB_REPO"] == "me/adapter-GGUF"
    assert export["HF_TOKEN"] == "t"


def test_merged_1_puts_the_merged_model_beside_the_adapters_repo(container):
    result, calls = container(RECIPE="r", HUB_REPO="me/adapter", EXPORT="1", MERGED="1")
    assert result.returncode == 0, result.stderr
    assert (calls[1]["HUB_REPO"], calls[1]["MERGED_REPO"]) == ("me/adapter-GGUF", "me/adapter-merged")
    _, calls = container(RECIPE="r", HUB_REPO="me/adapter", EXPORT="1", MERGED="1", MERGED_REPO="me/full")
    assert calls[1]["MERGED_REPO"] == "me/full"
    _, calls = container(RECIPE="r", HUB_REPO="me/adapter", EXPORT="1")
    assert calls[1]["MERGED_REPO"] == ""  # empty is unset to export


def test_export_follows_a_custom_train_output_dir_and_names(container):
    result, calls = container(
        EXPORT="1", OUTPUT_DIR="runs/a", EXPORT_DIR="runs/a-gguf", HUB_REPO="me/a", GGUF_REPO="me/a-q4"
    )
    assert result.returncode == 0, result.stderr
    train, export = calls
    assert train["OUTPUT_DIR"] == "runs/a"
    assert (export["ADAPTER"], export["OUTPUT_DIR"], export["HUB_REPO"]) == ("runs/a", "runs/a-gguf", "me/a-q4")


def test_export_follows_the_recipes_own_output_dir(container):
    """llama3-8b-finetome writes to outputs/llama3-8b-finetome; export must read it there."""
    result, calls = container(RECIPE="llama3-8b-finetome", HUB_REPO="me/llama3", EXPORT="1")
    assert result.returncode == 0, result.stderr
    export = calls[1]
    assert export["ADAPTER"] == "outputs/llama3-8b-finetome"
    assert export["HUB_REPO"] == "me/llama3-GGUF"


def test_export_follows_settings_from_a_dot_env_in_data(container):
    (container.data / ".env").write_text("RECIPE=llama3-8b-finetome\nOUTPUT_DIR=runs/b\nHUB_REPO=me/b\n")
    result, calls = container(EXPORT="1")
    assert result.returncode == 0, result.stderr
    assert (calls[1]["ADAPTER"], calls[1]["HUB_REPO"]) == ("runs/b", "me/b-GGUF")


def test_without_hub_repo_the_export_pushes_nowhere(container):
    result, calls = container(EXPORT="1")
    assert result.returncode == 0, result.stderr
    assert calls[1]["HUB_REPO"] == ""


def test_a_failed_training_stops_the_run_before_export(container):
    result, calls = container(EXPORT="1", FAIL_STAGES="train")
    assert result.returncode == 3
    assert [c["stage"] for c in calls] == ["train"]


def test_a_bad_export_value_is_refused_before_training(container):
    result, calls = container(EXPORT="yes please")
    assert result.returncode == 2
    assert calls == []
    assert "EXPORT='yes please'" in result.stderr


@pytest.mark.parametrize("stage", ["train", "export"])
def test_one_stage_runs_alone_and_passes_its_arguments(container, stage):
    result, calls = container(stage, "--help", EXPORT="1")
    assert result.returncode == 0, result.stderr
    assert [(c["stage"], c["args"]) for c in calls] == [(stage, ["--help"])]


def test_the_export_stage_exit_status_is_the_containers(container):
    result, _ = container("export", FAIL_STAGES="export")
    assert result.returncode == 3


def test_any_other_command_runs_as_given(container):
    result, calls = container("python", "-m", "train", "--help")
    assert result.returncode == 0
    assert [(c["stage"], c["args"]) for c in calls] == [("train", ["--help"])]


def test_help_describes_the_variables(container):
    result, calls = container("help")
    assert result.returncode == 0 and calls == []
    for name in ("EXPORT", "ADAPTER", "EXPORT_DIR", "GGUF_REPO", "MERGED_REPO"):
        assert name in result.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_data_folder_is_a_clear_error(container, tmp_path):
    (tmp_path / "data").chmod(0o555)
    try:
        result, calls = container()
    finally:
        (tmp_path / "data").chmod(0o755)
    assert result.returncode == 2 and calls == []
    assert "--user" in result.stderr


def test_an_old_driver_stops_the_run_before_training_naming_the_build_that_fits(container):
    result, calls = container(RECIPE="llama3-8b-finetome", FAKE_DRIVER="535.104.05", FAKE_CUDA_ERROR=TOO_OLD)
    assert result.returncode == 2 and calls == []
    assert "535.104.05" in result.stderr
    assert "needs >= 580" in result.stderr
    assert "--build-arg TORCH_CUDA=cu128" in result.stderr


def test_the_train_stage_alone_is_checked_too(container):
    result, calls = container("train", FAKE_DRIVER="535.104.05", FAKE_CUDA_ERROR=TOO_OLD)
    assert result.returncode == 2 and calls == []


def test_a_new_enough_driver_where_cuda_still_fails_passes_on_torchs_reason(container):
    result, calls = container(FAKE_DRIVER="580.65.06", FAKE_CUDA_ERROR="CUDA driver initialization failed.")
    assert result.returncode == 2 and calls == []
    assert "580.65.06 is new enough" in result.stderr
    assert "CUDA driver initialization failed" in result.stderr
    assert "Triggered internally" not in result.stderr


@pytest.mark.skipif(PROC_DRIVER_VERSION.exists(), reason="this host has an NVIDIA driver")
def test_without_a_driver_it_says_to_run_with_gpus_all(container):
    result, calls = container(FAKE_DRIVER="", FAKE_CUDA_ERROR=NO_DRIVER)
    assert result.returncode == 2 and calls == []
    assert "--gpus all" in result.stderr
    assert "NVIDIA Container Toolkit" in result.stderr


def test_the_demo_recipe_trains_without_cuda(container):
    result, calls = container(RECIPE="demo", FAKE_DRIVER="", FAKE_CUDA_ERROR=NO_DRIVER)
    assert result.returncode == 0, result.stderr
    assert [c["stage"] for c in calls] == ["train"]


def test_export_alone_needs_no_cuda(container):
    result, calls = container("export", FAKE_DRIVER="", FAKE_CUDA_ERROR=NO_DRIVER)
    assert result.returncode == 0, result.stderr
    assert [c["stage"] for c in calls] == ["export"]
