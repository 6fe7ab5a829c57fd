"""`python -m export.converter install`: llama.cpp's converter out of the llama-cpp-python sdist."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from export.converter import PIECES, ConverterError, extract_converter, install, locate_converter

SDIST_DIR = Path(__file__).resolve().parents[2] / ".cache" / "sdist"


def _sdist() -> Path:
    version = importlib.metadata.version("llama-cpp-python")
    path = SDIST_DIR / f"llama_cpp_python-{version}.tar.gz"
    if not path.is_file():
        pytest.skip(f"{path} not downloaded (make setup fetches it)")
    return path


def test_install_extracts_the_converter_scripts_and_vendored_gguf_py(tmp_path):
    folder = install(_sdist(), tmp_path / "conv")
    for piece in PIECES:
        assert (folder / piece.rstrip("/")).exists(), piece
    assert (folder / "VERSION").read_text().strip() == importlib.metadata.version("llama-cpp-python")
    # The vendored gguf-py is the one with LazyChunkedTensor (PyPI gguf 0.19.0 lacks it).
    code = f"import sys; sys.path.insert(0, {str(folder / 'gguf-py')!r}); import gguf; print(hasattr(gguf, 'LazyChunkedTensor'))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"
    assert locate_converter(folder) == folder


def test_an_sdist_of_another_version_is_refused(tmp_path):
    other = tmp_path / "llama_cpp_python-0.0.1.tar.gz"
    other.write_bytes(b"")
    with pytest.raises(ConverterError, match="0.0.1, but .* is installed"):
        extract_converter(other, tmp_path / "conv", importlib.metadata.version("llama-cpp-python"))
    assert not (tmp_path / "conv").exists()


def test_missing_converter_error_names_the_install_command(tmp_path):
    with pytest.raises(ConverterError, match=r"python -m export.converter install"):
        locate_converter(tmp_path / "nothing-here")


def test_cli_install_and_where(tmp_path):
    env_folder = tmp_path / "conv"
    import os

    env = dict(os.environ, LLAMA_CPP_CONVERTER=str(env_folder))
    run = lambda *args: subprocess.run([sys.executable, "-m", "export.converter", *args], capture_output=True,  # noqa: E731
                                       text=True, env=env, timeout=120)
    missing = run("where")
    assert missing.returncode == 2 and "python -m export.converter install" in missing.stderr
    installed = run("install", "--sdist", str(_sdist()))
    assert installed.returncode == 0, installed.stderr
    assert run("where").stdout.strip() == str(env_folder)
