"""The files the serve image is built from, as one folder: what the Space holds and what CI builds.

``Dockerfile.serve`` becomes the bundle's ``Dockerfile`` and the Space card its
``README.md`` (which ``pyproject.toml`` also names as the package readme); the
rest are the files the Dockerfile copies. Hidden files (``.env``!) and caches
never go in.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from serve.model import ServeError

ROOT = Path(__file__).resolve().parent.parent
# Bundle path -> project path; folders are taken whole.
SOURCES = {
    "Dockerfile": "Dockerfile.serve",
    "README.md": "serve/space/README.md",
    "pyproject.toml": "pyproject.toml",
    "requirements/constraints.txt": "requirements/constraints.txt",
    "loraship": "loraship",
    "serve": "serve",
}


def _left_out(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__" or name.endswith((".pyc", ".egg-info"))


def bundle_files(root: Path = ROOT) -> dict[str, Path]:
    """Bundle path -> the project file it is, sorted by bundle path."""
    files: dict[str, Path] = {}
    for target, source in SOURCES.items():
        path = root / source
        if path.is_file():
            files[target] = path
        elif path.is_dir():
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not _left_out(d))
                for name in names:
                    file = Path(folder) / name
                    if not _left_out(name) and file.is_file() and not file.is_symlink():
                        files[f"{target}/{file.relative_to(path).as_posix()}"] = file
        else:
            raise ServeError(
                f"{path} is missing: the serve bundle is built from a loraship checkout; run this from one"
            )
    return dict(sorted(files.items()))


def write_bundle(target: str | os.PathLike, root: Path = ROOT) -> list[str]:
    """Copy the bundle into ``target`` (a new or empty folder); return its paths."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ServeError(f"DIR={str(target)!r}: not a new or empty folder; give one (the bundle is exactly what it holds)")
    files = bundle_files(root)
    for name, source in files.items():
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
    return list(files)
