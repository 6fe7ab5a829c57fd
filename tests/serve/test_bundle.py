"""The serve bundle: the files the serve image is built from, which the Space holds and CI builds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serve.bundle import SOURCES, bundle_files
from serve.model import ServeError

ROOT = Path(__file__).resolve().parents[2]


def bundle_cli(directory: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "serve", "bundle", str(directory)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def copied_sources(dockerfile: Path) -> list[str]:
    """What the Dockerfile's COPY instructions take from the build context (stage-to-stage copies aside)."""
    from dockerfile_parse import DockerfileParser

    sources = []
    for instruction in DockerfileParser(str(dockerfile)).structure:
        if instruction["instruction"] != "COPY":
            continue
        words = instruction["value"].split()
        if any(word.startswith("--from") for word in words):
            continue
        sources += [word for word in words if not word.startswith("--")][:-1]
    return sources


def test_the_bundle_is_the_dockerfile_the_card_and_exactly_what_the_dockerfile_copies(tmp_path):
    target = tmp_path / "bundle"
    result = bundle_cli(target)
    assert result.returncode == 0, result.stderr
    written = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert result.stdout.splitlines() == written

    assert (target / "Dockerfile").read_bytes() == (ROOT / "Dockerfile.serve").read_bytes()
    # The Space card; pyproject.toml names README.md as the package readme, so it serves both.
    assert (target / "README.md").read_bytes() == (ROOT / "serve" / "space" / "README.md").read_bytes()
    sources = copied_sources(target / "Dockerfile")
    assert sorted(sources) == sorted(name for name in SOURCES if name != "Dockerfile")
    for name in written:
        if name != "Dockerfile":
            assert any(name == s or name.startswith(s.rstrip("/") + "/") for s in sources), name
    assert "serve/app.py" in written and "loraship/hub.py" in written


def test_hidden_files_caches_and_links_stay_out(tmp_path):
    root = tmp_path / "checkout"
    for source in SOURCES.values():
        src, dst = ROOT / source, root / source
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)
    (root / "serve" / ".env").write_text("HF_TOKEN=hf_never_uploaded\n")
    (root / "serve" / "__pycache__").mkdir()
    (root / "serve" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    (root / "loraship" / ".tmp-half-written").mkdir()
    (root / "loraship" / ".tmp-half-written" / "x.py").write_text("")
    (tmp_path / "outside.py").write_text("# not the project's")
    (root / "serve" / "elsewhere.py").symlink_to(tmp_path / "outside.py")

    names = set(bundle_files(root))
    assert "serve/app.py" in names and "Dockerfile" in names
    assert not [n for n in names if ".env" in n or "__pycache__" in n or ".tmp-" in n or "elsewhere" in n]


def test_a_folder_that_is_not_empty_is_refused_and_left_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = bundle_cli(tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        f"error: DIR={str(tmp_path)!r}: not a new or empty folder; give one (the bundle is exactly what it holds)"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_outside_a_checkout_the_bundle_says_where_to_run_it(tmp_path):
    with pytest.raises(ServeError, match=r"Dockerfile\.serve is missing: .* run this from one"):
        bundle_files(tmp_path)
