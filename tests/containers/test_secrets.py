"""The Hugging Face token and the trackers' keys never become part of an image (Dockerfiles and built images)."""

from __future__ import annotations

import pytest

from tests.fixtures.containers import DEBIAN_BASE, REPO, SERVE_IMAGE, TRAIN_IMAGE
from tests.fixtures.token_leaks import dockerfile_token_mentions, image_token_mentions

DOCKERFILES = ["Dockerfile.serve", "Dockerfile.train"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_never_names_the_token_outside_comments(name):
    assert dockerfile_token_mentions((REPO / name).read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "instruction",
    [
        "ARG HF_TOKEN",
        "ARG hf_token=",
        "ENV HF_TOKEN=abc",
        "ENV PORT=7860 HUGGING_FACE_HUB_TOKEN=abc",
        "ENV HF_TOKEN abc",
        "ENV WANDB_API_KEY=abc",
        "ARG MLFLOW_TRACKING_TOKEN",
        'RUN echo "$HF_TOKEN" > /root/token',
        # Built at run time so that no token-shaped string is committed.
        "LABEL token=hf_" + "a" * 34,
    ],
)
def test_the_dockerfile_check_catches_a_token_instruction(instruction):
    text = f"ARG BASE_IMAGE=debian\nFROM ${{BASE_IMAGE}}\n# HF_TOKEN only at run time\n{instruction}\n"
    found = dockerfile_token_mentions(text)
    assert len(found) == 1 and found[0].startswith("line 4:")


def test_the_dockerfile_check_allows_the_token_in_comments():
    text = "# Give HF_TOKEN with -e HF_TOKEN at run time.\nFROM debian\nENV PORT=7860\n"
    assert dockerfile_token_mentions(text) == []


def test_the_image_check_reads_config_and_history():
    inspect = {"Config": {"Env": ["PATH=/usr/bin", "HF_TOKEN=x"], "Labels": {"a": "b"}}}
    history = [{"CreatedBy": "|1 HF_TOKEN=secret /bin/sh -c pip install x"}, {"CreatedBy": "/bin/sh -c true"}]
    found = image_token_mentions(inspect, history)
    assert found == ["config Env: HF_TOKEN", "history: |1 HF_TOKEN=secret /bin/sh -c pip install x"]


@pytest.mark.parametrize("image", [SERVE_IMAGE, TRAIN_IMAGE], ids=["serve", "train"])
def test_built_image_holds_no_token_in_config_or_history(podman, image):
    if not podman.image_exists(image):
        pytest.skip(f"{image} is not built here (.ci/images.sh builds the serve image)")
    assert image_token_mentions(podman.inspect(image), podman.history(image)) == []


@pytest.mark.slow
def test_the_image_check_catches_a_build_arg_token(podman, tmp_path):
    """A real build with the classic mistake (ARG HF_TOKEN + --build-arg) is caught."""
    if not podman.image_exists(DEBIAN_BASE):
        pytest.skip(f"{DEBIAN_BASE} is absent (.ci/images.sh setup makes it)")
    (tmp_path / "Dockerfile").write_text(
        f'FROM {DEBIAN_BASE}\nARG HF_TOKEN\nRUN test -n "$HF_TOKEN"\n', encoding="utf-8"
    )
    tag = "localhost/loraship-ci/leaky-token-test:latest"
    podman.run("build", "--pull=never", "--build-arg", "HF_TOKEN=not-a-real-token", "-t", tag, str(tmp_path))
    try:
        found = image_token_mentions(podman.inspect(tag), podman.history(tag))
    finally:
        podman.run("rmi", "-f", tag, check=False)
    assert any("HF_TOKEN=not-a-real-token" in place for place in found), found
