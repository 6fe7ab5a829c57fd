"""The small manifest every artifact folder carries: what made it, from what, sha256.

``manifest.json`` looks like::

    {
      "format": "loraship-manifest/1",
      "kind": "adapter" | "gguf" | ...,
      "stage": "train" | "export" | ...,
      "created_at": "2026-11-23T17:45:00+00:00",
      "inputs": {"base_model": "...", "dataset": "..."},
      "settings": {... secrets removed ...},
      "versions": {"loraship": "0.1.0", "torch": "2.13.0", ...},
      "files": [{"name": "adapter_model.safetensors", "size": 123, "sha256": "..."}],
      "extra": {... stage-specific facts ...}
    }

The next stage reads it to learn where an artifact came from, and checks the
sha256 of each file before trusting it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from loraship import __version__
from loraship.atomic import write_json

MANIFEST_NAME = "manifest.json"
FORMAT = "loraship-manifest/1"
SECRET_MARKERS = ("token", "secret", "password", "api_key", "apikey")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (GGUFs are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"name", "size", "sha256"}`` for one file; ``name`` is relative to ``root``."""
    path = Path(path)
    name = path.relative_to(root).as_posix() if root is not None else path.name
    return {"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of ``names`` (without importing them); absent ones are skipped."""
    versions = {"loraship": __version__}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def is_secret_key(key: str) -> bool:
    """True for setting names that hold credentials (``HF_TOKEN``, ``JUDGE_API_KEY``...)."""
    lowered = key.lower()
    return any(marker in lowered for marker in SECRET_MARKERS)


def redact(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``settings`` with every credential-like key dropped."""
    return {k: v for k, v in settings.items() if not is_secret_key(k)}


def build_manifest(
    *,
    kind: str,
    stage: str,
    folder: str | os.PathLike,
    files: Iterable[str | os.PathLike],
    inputs: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    libraries: Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a manifest for ``files`` (paths inside ``folder``)."""
    folder = Path(folder)
    described = [describe_file(folder / Path(f), folder) for f in files]
    return {
        "format": FORMAT,
        "kind": kind,
        "stage": stage,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": dict(inputs or {}),
        "settings": redact(settings or {}),
        "versions": library_versions(libraries),
        "files": described,
        "extra": dict(extra or {}),
    }


def write_manifest(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` into ``folder`` atomically."""
    return write_json(Path(folder) / MANIFEST_NAME, manifest)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest in ``folder``, or None when there is none."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def find_file_entry(manifest: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The manifest's entry for file ``name``, if it lists one."""
    for entry in manifest.get("files", []):
        if entry.get("name") == name:
            return entry
    return None


def verify_files(folder: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Check every listed file's size and sha256; return one problem line per mismatch."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    if manifest is None:
        return [f"{folder / MANIFEST_NAME} is missing"]
    problems = []
    for entry in manifest.get("files", []):
        path = folder / entry["name"]
        if not path.is_file():
            problems.append(f"{path} is listed in the manifest but missing")
            continue
        if path.stat().st_size != entry.get("size"):
            problems.append(f"{path} has size {path.stat().st_size}, manifest says {entry.get('size')}")
            continue
        if sha256_file(path) != entry.get("sha256"):
            problems.append(f"{path} does not match its sha256 in {folder / MANIFEST_NAME}")
    return problems
