"""llama.cpp's own HF -> GGUF converter, taken from the llama-cpp-python source distribution.

The sdist of the *installed* runtime vendors the llama.cpp tree it was built from, so the converter
always matches the runtime that loads its output, without a git clone. ``python -m export.converter
install`` puts it in a cache folder; it runs as a subprocess (its gguf-py must win over PyPI ``gguf``).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import click

from loraship.errors import UserError

PACKAGE = "llama-cpp-python"
VENDORED = "vendor/llama.cpp/"
#: What convert_hf_to_gguf.py and convert_lora_to_gguf.py import, relative to the llama.cpp root.
PIECES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
#: Overrides where the converter lives (a folder holding the PIECES).
FOLDER_ENV = "LLAMA_CPP_CONVERTER"


class ConverterError(UserError):
    """The converter is missing or the sdist is not what we need."""


def runtime_version() -> str:
    """The installed llama-cpp-python version (the converter must match it)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConverterError(
            "llama-cpp-python is not installed: run `make setup` "
            "(it compiles llama-cpp-python once and installs the converter)"
        ) from None


def default_folder(version: str) -> Path:
    """``LLAMA_CPP_CONVERTER`` if set, else ``<loraship cache>/llama.cpp-VERSION``."""
    from loraship.embedded import cache_root

    override = os.environ.get(FOLDER_ENV)
    if override:
        return Path(override)
    return cache_root() / f"llama.cpp-{version}"


def is_installed(folder: Path) -> bool:
    return all((folder / piece.rstrip("/")).exists() for piece in PIECES) and (
        folder / "gguf-py" / "gguf" / "__init__.py"
    ).is_file()


def install_hint(version: str) -> str:
    return (
        f"llama.cpp's converter for llama-cpp-python {version} is not installed: run "
        "`make setup`, or `python -m export.converter install` "
        "(add `--sdist PATH` to use a downloaded llama_cpp_python source archive)"
    )


def locate_converter(folder: str | os.PathLike | None = None) -> Path:
    """The folder holding the converter; a :class:`ConverterError` saying how to install it if absent."""
    version = runtime_version()
    folder = Path(folder) if folder else default_folder(version)
    if not is_installed(folder):
        raise ConverterError(install_hint(version))
    return folder


def download_sdist(version: str, dest: Path) -> Path:
    """Fetch the llama-cpp-python source archive through pip (the package registry)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
        "-d", str(dest), f"{PACKAGE}=={version}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConverterError(
            f"could not download the {PACKAGE} {version} source archive "
            f"({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'pip failed'}); "
            "download it yourself and pass `--sdist PATH`"
        )
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise ConverterError(f"pip downloaded no llama_cpp_python-{version}.tar.gz into {dest}")
    return found[0]


def _sdist_version(sdist: Path) -> str | None:
    name = sdist.name
    prefix = "llama_cpp_python-"
    if name.startswith(prefix) and name.endswith(".tar.gz"):
        return name[len(prefix) : -len(".tar.gz")]
    return None


def extract_converter(sdist: Path, folder: Path, version: str) -> Path:
    """Copy the converter pieces out of ``sdist`` into ``folder`` (atomically)."""
    from loraship.atomic import atomic_path

    if not sdist.is_file():
        raise ConverterError(f"--sdist {str(sdist)!r}: no such file")
    found_version = _sdist_version(sdist)
    if found_version is not None and found_version != version:
        raise ConverterError(
            f"--sdist {str(sdist)!r} is llama-cpp-python {found_version}, but {version} is installed: "
            f"use llama_cpp_python-{version}.tar.gz so the converter matches the runtime"
        )
    with tarfile.open(sdist, "r:gz") as archive, atomic_path(folder) as tmp:
        tmp.mkdir()
        members = []
        for member in archive.getmembers():
            _, _, inner = member.name.partition("/")
            if not inner.startswith(VENDORED):
                continue
            rel = inner[len(VENDORED) :]
            if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in PIECES):
                continue
            if not (member.isfile() or member.isdir()) or rel.startswith("/") or ".." in rel.split("/"):
                continue
            member.name = rel
            members.append(member)
        if not members:
            raise ConverterError(f"{sdist} holds no {VENDORED}convert_hf_to_gguf.py: not a llama-cpp-python sdist")
        if hasattr(tarfile, "data_filter"):
            archive.extractall(tmp, members=members, filter="data")
        else:  # Python < 3.11.4 has no extraction filters; members were vetted above
            archive.extractall(tmp, members=members)
        (tmp / "VERSION").write_text(f"{version}\n", encoding="utf-8")
        if not is_installed(tmp):
            missing = [p for p in PIECES if not (tmp / p.rstrip("/")).exists()]
            raise ConverterError(f"{sdist} lacks {', '.join(missing)}")
    return folder


def install(sdist: str | os.PathLike | None = None, folder: str | os.PathLike | None = None) -> Path:
    """Install the converter matching the installed runtime; return its folder."""
    version = runtime_version()
    target = Path(folder) if folder else default_folder(version)
    if sdist is None:
        with tempfile.TemporaryDirectory(prefix="loraship-sdist-") as tmp:
            return extract_converter(download_sdist(version, Path(tmp)), target, version)
    return extract_converter(Path(sdist), target, version)


def converter_env() -> dict[str, str]:
    """Environment for the converter subprocess: no PYTHONPATH that could shadow its gguf-py."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("NO_LOCAL_GGUF", None)
    # The converter must never reach for the Hub: every input is a local folder.
    env["HF_HUB_OFFLINE"] = "1"
    return env


def converter_command(script: str, folder: Path, *args: str) -> list[str]:
    """``python SCRIPT ARGS`` for one of the converter scripts in ``folder``."""
    return [sys.executable, str(folder / script), *args]


def gguf_py_command(folder: Path, code: str, *args: str) -> list[str]:
    """Run ``code`` in a fresh interpreter that imports the vendored gguf-py first."""
    prelude = f"import sys; sys.path.insert(0, {str(folder / 'gguf-py')!r})\n"
    return [sys.executable, "-c", prelude + code, *args]


@click.group()
def cli() -> None:
    """Install or locate llama.cpp's HF -> GGUF converter."""


@cli.command("install")
@click.option("--sdist", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="llama_cpp_python-VERSION.tar.gz to take the converter from (default: download it with pip).")
@click.option("--folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Where to put it (default: ${FOLDER_ENV}, else the loraship cache).")
def install_command(sdist: Path | None, folder: Path | None) -> None:
    """Extract the converter from the llama-cpp-python sdist of the installed version."""
    from loraship.cli import report_errors

    @report_errors
    def run() -> None:
        version = runtime_version()
        target = Path(folder) if folder else default_folder(version)
        stamp = target / "VERSION"
        if is_installed(target) and stamp.is_file() and stamp.read_text().strip() == version:
            click.echo(f"llama.cpp converter {version} already installed in {target}")
            return
        if target.exists():
            shutil.rmtree(target)
        path = install(sdist, target)
        click.echo(f"llama.cpp converter {version} installed in {path}")

    run()


@cli.command("where")
def where_command() -> None:
    """Print the converter folder (exit 2 with the install command if it is missing)."""
    from loraship.cli import report_errors

    @report_errors
    def run() -> None:
        click.echo(str(locate_converter()))

    run()


if __name__ == "__main__":
    cli()
