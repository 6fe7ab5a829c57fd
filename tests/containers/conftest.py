"""The ``podman`` fixture for the image tests (tests/fixtures/containers.py holds the engine and image names).

Tests that need a built image skip when podman or the image is absent; the
Dockerfile and entrypoint tests never need either.
"""

from __future__ import annotations

import shutil

import pytest

from tests.fixtures.containers import Podman


@pytest.fixture(scope="session")
def podman() -> Podman:
    executable = shutil.which("podman")
    if executable is None:
        pytest.skip("podman is not installed (.ci/images.sh sets it up)")
    engine = Podman(executable)
    if engine.run("info", check=False, timeout=60).returncode != 0:
        pytest.skip("podman is installed but not usable here (run .ci/images.sh setup)")
    return engine
