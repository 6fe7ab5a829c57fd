"""The README's Ship commands, read from its code blocks and run as written against the stand-in Hub.

Only the Hub is swapped: HF_ENDPOINT points at the stand-in Hub and the `hf_...` placeholder becomes a stand-in
token. The stand-in Hub serves, under the recipe's own base model id, a tiny model that ends every chat by itself,
so the export's checks run as they do on a real fine-tune. The `docker run` is run as the image runs it: its `-e`
variables and arguments to the image's entrypoint, in a folder standing in for the `/data` it mounts. On a CPU its
`all` stops before any download (it needs CUDA); the README's `export` stage then publishes the adapter that train
leaves in the recipe's OUTPUT_DIR (made here with peft), and `make space` deploys the Space for the published GGUF.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serve.bundle import bundle_files
from tests.fixtures.adapters import make_train_output
from tests.fixtures.gguf_selectors import hub_ollama_picks, llama_cpp_pick
from tests.fixtures.hub import running_stub_hub
from tests.fixtures.models import copy_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TOKEN = "hf_readme_ship_stand_in_token"
#: From the test's own environment (nothing else leaks in); the Hub's variables are set per run.
PASS_THROUGH = ("HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "LLAMA_CPP_CONVERTER")
#: `docker run` options that take a value as the next word.
VALUE_OPTIONS = ("--gpus", "--user", "-u", "-v", "--volume", "--name", "-p", "--publish", "-w", "--workdir")


def readme_commands() -> list[str]:
    """Every command in the README's bash blocks: continued lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.sub(r"(^|\s+)#\s.*$", "", command).strip()
            if command:
                commands.append(command)
    return commands


def readme_command(pattern: str) -> str:
    found = [c for c in readme_commands() if re.search(pattern, c)]
    assert len(found) == 1, f"README.md: {len(found)} commands match {pattern!r}: {found}"
    return found[0]


def docker_run(command: str) -> tuple[dict[str, str | None], str, list[str]]:
    """A `docker run` line as (its -e variables, None for one taken from the shell; the /data mount; the arguments)."""
    words = shlex.split(command)
    assert words[:2] == ["docker", "run"], command
    env: dict[str, str | None] = {}
    mount, i = "", 2
    while words[i].startswith("-"):
        word = words[i]
        if word in ("-e", "--env"):
            key, has_value, value = words[i + 1].partition("=")
            env[key] = value if has_value else None
            i += 1
        elif word in ("-v", "--volume"):
            mount = words[i + 1]
            i += 1
        elif word in VALUE_OPTIONS:
            i += 1
        i += 1
    return env, mount, words[i + 1:]  # words[i] is the image


def recipe_setting(recipe: str, key: str) -> str:
    return re.search(rf"^{key}=(.*)$", (ROOT / "recipes" / f"{recipe}.env").read_text(), re.M).group(1).strip()


def stopping_tiny_base(tiny_llama_dir: Path, folder: Path) -> Path:
    """The tiny Llama, made to answer every chat with its end-of-turn token: a model that stops by itself."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    base = copy_model(tiny_llama_dir, folder)
    eos = AutoTokenizer.from_pretrained(base).eos_token_id
    weights = load_file(base / "model.safetensors")
    embedding = weights["model.embed_tokens.weight"]  # tied: the output layer too
    # One dimension shared by every token dominates the final norm's output, so the token that has the most of
    # it wins every step by a wide margin.
    embedding[:, 0] = 1.0
    embedding[eos, 0] = 2.0
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    return base


@pytest.fixture(scope="module")
def shipped(tiny_llama_dir, tmp_path_factory):
    """The Ship section's commands run in order; yields what each left (the stand-in Hub keeps serving)."""
    from export.converter import ConverterError, locate_converter

    try:
        locate_converter()
    except ConverterError as err:
        pytest.skip(f"llama.cpp converter not installed: {err}")
    if not (ROOT / ".venv" / "bin" / "python").is_file() or shutil.which("make") is None:
        pytest.skip("`make space` needs make and the .venv that `make setup` builds")

    root = tmp_path_factory.mktemp("ship")
    # make as the README's user has it after `make setup`, except that it never reinstalls .venv during a test
    # (an edited pyproject.toml would make the setup stamp out of date).
    shim = root / "bin" / "make"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {shutil.which("make")} -o .venv/.loraship-installed "$@"\n')
    shim.chmod(0o755)
    run_env, mount, args = docker_run(readme_command(r"^docker run "))
    recipe = run_env["RECIPE"]
    base_id = recipe_setting(recipe, "BASE_MODEL")
    data = root / mount.split(":")[0].replace("$PWD/", "")
    data.mkdir()
    assert mount.split(":")[1] == "/data"  # the image's working directory: its relative paths land in `data`
    base = stopping_tiny_base(tiny_llama_dir, root / "base")

    with pytest.MonkeyPatch.context() as monkeypatch, running_stub_hub(monkeypatch, root) as hub:
        for path in sorted(base.iterdir()):
            hub.add_file(base_id, path.name, path.read_bytes(), private=True)  # gated on the real Hub
        env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
        env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
                   PYTHONPATH=str(ROOT), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1",
                   # The train image's own cache settings, under the mounted folder.
                   HF_HOME=str(data / "cache" / "huggingface"), XDG_CACHE_HOME=str(data / "cache"),
                   MPLCONFIGDIR=str(data / "cache" / "matplotlib"))
        container_env = {**env, **{k: (TOKEN if k == "HF_TOKEN" else v) for k, v in run_env.items()}}
        entrypoint = ["sh", str(ROOT / "docker" / "entrypoint.sh")]

        def run_image(*extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(entrypoint + args + list(extra), cwd=data, env=container_env, capture_output=True,
                                  text=True, timeout=300)

        requests = len(hub.requests)
        everything = run_image()  # as written: `all`
        requests_before_export = len(hub.requests) - requests

        # What train leaves in the recipe's OUTPUT_DIR on the GPU box, for the README's `export` stage.
        make_train_output(base, data / recipe_setting(recipe, "OUTPUT_DIR"), base_name=base_id)
        exported = run_image("export")
        assert exported.returncode == 0, exported.stderr[-3000:]

        space_command = readme_command(r"\bmake space\b").replace("hf_...", TOKEN)
        space = subprocess.run(["bash", "-c", space_command], cwd=ROOT, capture_output=True, text=True, timeout=180,
                               env={**env, "HF_HOME": str(root / "deploy-home"),
                                    "PATH": os.pathsep.join([str(shim.parent), env["PATH"]])})
        yield {"hub": hub, "run_env": run_env, "all": everything, "all_requests": requests_before_export,
               "export": exported, "space_command": space_command, "space": space, "data": data, "root": root}


def gguf_repo(shipped) -> str:
    return shipped["run_env"]["HUB_REPO"] + "-GGUF"


def test_the_readme_names_the_repos_the_docker_run_makes(shipped):
    adapter, gguf = re.search(r"The adapter goes to `([^`]+)`, the GGUFs to `([^`]+)`", README).groups()
    assert (adapter, gguf) == (shipped["run_env"]["HUB_REPO"], gguf_repo(shipped))


def test_the_docker_run_as_written_stops_before_any_download_without_cuda(shipped):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine would train the recipe")
    everything = shipped["all"]
    assert everything.returncode == 2, everything.stderr
    assert everything.stderr.startswith("error: CUDA does not start"), everything.stderr
    assert shipped["all_requests"] == 0


def test_the_export_stage_publishes_a_public_q4_k_m_gguf_repo(shipped):
    hub, repo = shipped["hub"], gguf_repo(shipped)
    assert shipped["run_env"]["HUB_PRIVATE"] == "false" and not hub.is_private(repo)
    files = hub.repo_files(repo)
    ggufs = sorted(name for name in files if name.endswith(".gguf"))
    assert len(ggufs) == 1 and ggufs[0].endswith("-Q4_K_M.gguf"), ggufs  # the default QUANT_TYPES; F16 stays home
    assert {"README.md", "Modelfile", "manifest.json"} <= set(files)
    assert hub.commits(repo) == ["initial commit", "Upload GGUF export with loraship"]
    assert not any(TOKEN.encode() in data for data in files.values())


def test_make_space_deploys_the_published_gguf(shipped):
    hub, space_result = shipped["hub"], shipped["space"]
    assert space_result.returncode == 0, space_result.stderr[-3000:]
    words = dict(re.findall(r"(\w+)=(\S+)", shipped["space_command"]))
    space, model = words["SPACE"], words["MODEL"]
    assert model == gguf_repo(shipped)
    assert space_result.stdout.strip().splitlines()[-1] == f"{hub.url}/spaces/{space}"
    assert hub.space_sdk(space) == "docker" and hub.space_hardware(space) == "cpu-basic"
    assert hub.space_variables(space) == {"MODEL": model}
    assert hub.space_secrets(space) == {}  # the model repo is public: no token is stored
    uploaded = hub.repo_files(space, "space")
    assert uploaded == {name: path.read_bytes() for name, path in bundle_files().items()}
    assert TOKEN not in space_result.stdout + space_result.stderr


def test_the_three_pull_commands_find_the_published_gguf(shipped):
    from serve.model import resolve_model_path

    hub, repo = shipped["hub"], gguf_repo(shipped)
    listing = list(hub.repo_files(repo))
    (llama_repo, llama_tag), = re.findall(r"^llama-cli -hf (\S+):(\S+)$", "\n".join(readme_commands()), re.M)
    (ollama_repo, ollama_tag), = re.findall(r"^ollama run hf\.co/(\S+):(\S+)$", "\n".join(readme_commands()), re.M)
    serve_repos = re.findall(r"^MODEL=(\S+) make serve$", "\n".join(readme_commands()), re.M)
    assert llama_repo == ollama_repo == repo and repo in serve_repos
    gguf = next(name for name in listing if name.endswith(".gguf"))
    assert llama_cpp_pick(listing, llama_tag) == gguf
    assert hub_ollama_picks(listing, ollama_tag) == [gguf]
    assert resolve_model_path(repo).name == gguf  # what `MODEL=... make serve` serves
