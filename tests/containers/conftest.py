"""Podman access for the image tests: the engine config .ci/images.sh writes.

Tests that need a built image skip when podman or the image is absent; the
Dockerfile and entrypoint tests never need either.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE_CONFIG = REPO / ".cache" / "containers" / "containers.conf"
SERVE_IMAGE = os.environ.get("LORASHIP_SERVE_IMAGE", "localhost/loraship-serve:ci")
TRAIN_IMAGE = os.environ.get("LORASHIP_TRAIN_IMAGE", "localhost/loraship-train:ci")
DEBIAN_BASE = "localhost/loraship-ci/debian:bookworm"


class Podman:
    def __init__(self, executable: str):
        self.executable = executable
        self.env = dict(os.environ)
        if "CONTAINERS_CONF" not in self.env and ENGINE_CONFIG.is_file():
            self.env["CONTAINERS_CONF"] = str(ENGINE_CONFIG)

    def run(self, *args: str, check: bool = True, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.executable, *args], env=self.env, capture_output=True, text=True,
            check=check, timeout=timeout, **kwargs,
        )

    def image_exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    def inspect(self, image: str) -> dict:
        return json.loads(self.run("image", "inspect", image).stdout)[0]

    def history(self, image: str) -> list[dict]:
        return json.loads(self.run("history", "--no-trunc", "--format", "json", image).stdout)


@pytest.fixture(scope="session")
def podman() -> Podman:
    executable = shutil.which("podman")
    if executable is None:
        pytest.skip("podman is not installed (.ci/images.sh sets it up)")
    engine = Podman(executable)
    if engine.run("info", check=False, timeout=60).returncode != 0:
        pytest.skip("podman is installed but not usable here (run .ci/images.sh setup)")
    return engine
