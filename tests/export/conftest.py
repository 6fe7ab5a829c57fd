"""Fixtures for the export tests: a clean environment, a tiny train output, the embedded base, the converter."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.adapters import make_train_output
from tests.fixtures.export_runs import EXPORT_VARS


@pytest.fixture
def export_env(monkeypatch, tmp_path):
    """A clean environment and working directory (no stray .env) for one export run."""
    for var in EXPORT_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


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

