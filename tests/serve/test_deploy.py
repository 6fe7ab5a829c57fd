"""`python -m serve deploy` against the stand-in Hub: one command makes the chat Space; a second changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.bundle import bundle_files
from serve.deploy import COMMIT_MESSAGE

ROOT = Path(__file__).resolve().parents[2]
SPACE, MODEL = "me/quokka-chat", "me/quokka-gguf"
TOKEN = "hf_deploy_0123456789abcdefSECRET"
SETTINGS = ("SPACE", "MODEL", "MODEL_FILE", "SPACE_PRIVATE", "SPACE_HARDWARE", "API_KEY")


def deploy(hub, tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    """`python -m serve deploy` as a user runs it: the stand-in Hub, no saved login unless the test made one."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=str(ROOT), SPACE=SPACE, MODEL=MODEL)
    env.update(settings)
    return subprocess.run([sys.executable, "-m", "serve", "deploy"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def writes(hub, since: int = 0) -> list[tuple[str, str]]:
    """The requests that change something on the Hub (validate-yaml only checks the card)."""
    return [(r.method, r.path) for r in hub.requests[since:]
            if r.method in ("POST", "DELETE") and r.path != "/api/validate-yaml"]


def bundle_contents() -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in bundle_files().items()}


def seed_model(hub, *names: str, private: bool = False) -> None:
    for name in names or ("quokka-Q4_K_M.gguf",):
        hub.add_file(MODEL, name, b"GGUF, as far as deploy cares", private=private)


def test_the_first_deploy_creates_a_docker_space_from_the_bundle_and_prints_its_url(hub_server, tmp_path):
    seed_model(hub_server)
    result = deploy(hub_server, tmp_path, HF_TOKEN=TOKEN)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{hub_server.url}/spaces/{SPACE}\n"
    assert hub_server.space_sdk(SPACE) == "docker" and hub_server.space_hardware(SPACE) == "cpu-basic"
    assert not hub_server.is_private(SPACE, "space")
    assert hub_server.repo_files(SPACE, "space") == bundle_contents()
    assert hub_server.commits(SPACE, "space") == ["initial commit", COMMIT_MESSAGE]
    assert hub_server.space_variables(SPACE) == {"MODEL": MODEL}
    assert hub_server.space_secrets(SPACE) == {}  # a public model needs no token
    assert writes(hub_server) == [
        ("POST", "/api/repos/create"),
        ("POST", f"/api/spaces/{SPACE}/variables"),
        ("POST", f"/api/spaces/{SPACE}/preupload/main"),
        ("POST", f"/api/spaces/{SPACE}/commit/main"),
    ]


def test_space_private_and_space_hardware_apply_to_a_new_space(hub_server, tmp_path):
    seed_model(hub_server)
    result = deploy(hub_server, tmp_path, HF_TOKEN=TOKEN, SPACE_PRIVATE="true", SPACE_HARDWARE="cpu-upgrade")
    assert result.returncode == 0, result.stderr
    assert hub_server.is_private(SPACE, "space") and hub_server.space_hardware(SPACE) == "cpu-upgrade"


def test_a_second_deploy_with_nothing_changed_writes_nothing(hub_server, tmp_path):
    seed_model(hub_server, private=True)
    assert deploy(hub_server, tmp_path, HF_TOKEN=TOKEN).returncode == 0
    before = len(hub_server.requests)
    again = deploy(hub_server, tmp_path, HF_TOKEN=TOKEN)
    assert again.returncode == 0, again.stderr
    assert writes(hub_server, before) == []
    assert "nothing to upload" in again.stderr
    assert again.stdout == f"{hub_server.url}/spaces/{SPACE}\n"
    assert hub_server.commits(SPACE, "space") == ["initial commit", COMMIT_MESSAGE]


def test_a_private_model_puts_the_token_in_a_space_secret_and_nowhere_else(hub_server, tmp_path):
    seed_model(hub_server, private=True)
    runs = [deploy(hub_server, tmp_path, HF_TOKEN=TOKEN) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert hub_server.space_secrets(SPACE) == {"HF_TOKEN": TOKEN}
    assert hub_server.space_variables(SPACE) == {"MODEL": MODEL}
    assert "stored HF_TOKEN as a Space secret" in runs[0].stderr
    for run in runs:
        assert TOKEN not in run.stdout + run.stderr
    assert not any(TOKEN.encode() in data for data in hub_server.repo_files(SPACE, "space").values())
    # Nor in any file the run or the Hub left behind (the Hub's stored blobs, huggingface_hub's home).
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    # The only request that carried it in its body is the one setting the secret.
    carried = [(r.method, r.path) for r in hub_server.requests if r.json and TOKEN in repr(r.json)]
    assert carried == [("POST", f"/api/spaces/{SPACE}/secrets")]


def test_an_outdated_space_gets_one_commit_with_the_changed_files_and_without_stale_ones(hub_server, tmp_path):
    seed_model(hub_server)
    assert deploy(hub_server, tmp_path, HF_TOKEN=TOKEN).returncode == 0
    hub_server.add_file(SPACE, "serve/app.py", "# edited on the Hub", repo_type="space")
    hub_server.add_file(SPACE, "notes.txt", "left over", repo_type="space")
    commits = len(hub_server.commits(SPACE, "space"))

    result = deploy(hub_server, tmp_path, HF_TOKEN=TOKEN)
    assert result.returncode == 0, result.stderr
    assert hub_server.repo_files(SPACE, "space") == bundle_contents()
    assert len(hub_server.commits(SPACE, "space")) == commits + 1
    assert f"uploaded 1 of the bundle's {len(bundle_contents())} files in one commit, removed 1 (notes.txt)" in result.stderr


def test_changed_settings_update_the_variables_and_hardware_without_a_commit(hub_server, tmp_path):
    seed_model(hub_server, "quokka-Q4_K_M.gguf", "quokka-Q8_0.gguf")
    assert deploy(hub_server, tmp_path, HF_TOKEN=TOKEN).returncode == 0
    commits = hub_server.commits(SPACE, "space")

    result = deploy(hub_server, tmp_path, HF_TOKEN=TOKEN, MODEL_FILE="quokka-Q8_0.gguf", SPACE_HARDWARE="cpu-upgrade")
    assert result.returncode == 0, result.stderr
    assert hub_server.space_variables(SPACE) == {"MODEL": MODEL, "MODEL_FILE": "quokka-Q8_0.gguf"}
    assert hub_server.space_hardware(SPACE) == "cpu-upgrade"
    assert hub_server.commits(SPACE, "space") == commits

    # MODEL_FILE unset again: the Space serves the Q4_K_M again, not a stale variable's file.
    assert deploy(hub_server, tmp_path, HF_TOKEN=TOKEN, SPACE_HARDWARE="cpu-upgrade").returncode == 0
    assert hub_server.space_variables(SPACE) == {"MODEL": MODEL}


def saved_login(tmp_path: Path) -> None:
    """A `hf auth login` token in huggingface_hub's home: it may write, but deploy never stores it in a Space."""
    (tmp_path / "hf-home").mkdir(exist_ok=True)
    (tmp_path / "hf-home" / "token").write_text("hf_saved_login_token")


BAD_INPUTS = [
    # (id, model files or None, model private, settings, saved login, what the error line says)
    ("space-not-owner-name", None, False, {"SPACE": "quokka-chat", "HF_TOKEN": TOKEN}, False,
     ["SPACE='quokka-chat': not a Hub repo id; use owner/name"]),
    ("space-unset", None, False, {"SPACE": "", "HF_TOKEN": TOKEN}, False, ["SPACE: unset; set it to a Hub repo id"]),
    ("model-is-a-local-path", None, False, {"MODEL": "outputs/demo/export", "HF_TOKEN": TOKEN}, False,
     ["MODEL='outputs/demo/export': not a Hub repo id", "push the export there first"]),
    ("model-without-a-gguf", ["README.md"], False, {"HF_TOKEN": TOKEN}, False,
     [f"MODEL='{MODEL}': the repo holds no .gguf file", f"HUB_REPO={MODEL} python -m export"]),
    ("model-without-a-q4-k-m", ["quokka-Q8_0.gguf"], False, {"HF_TOKEN": TOKEN}, False,
     ["one *Q4_K_M.gguf among the repo's .gguf files (quokka-Q8_0.gguf)", "set MODEL_FILE"]),
    ("model-file-not-in-the-repo", None, False, {"HF_TOKEN": TOKEN, "MODEL_FILE": "quokka-F16.gguf"}, False,
     ["MODEL_FILE='quokka-F16.gguf'", "set MODEL_FILE"]),
    ("private-model-and-no-token-at-all", None, True, {}, False,
     [f"MODEL='{MODEL}'", "the token cannot see it (check HF_TOKEN)"]),
    ("private-model-with-only-a-saved-login", None, True, {}, True,
     [f"MODEL='{MODEL}' is private", "set HF_TOKEN"]),
    ("no-token-to-create-the-space", None, False, {}, False,
     [f"SPACE='{SPACE}'", "HTTP 401", "set HF_TOKEN"]),
]


@pytest.mark.parametrize("model_files, private, settings, login, needles",
                         [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_with_the_fix_status_2_and_nothing_uploaded(
        hub_server, tmp_path, model_files, private, settings, login, needles):
    seed_model(hub_server, *(model_files or []), private=private)
    if login:
        saved_login(tmp_path)
    result = deploy(hub_server, tmp_path, **settings)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert result.stdout == "" and "Traceback" not in result.stderr
    uploads = [w for w in writes(hub_server) if "/preupload/" in w[1] or "/commit/" in w[1]]
    assert uploads == []
    assert TOKEN not in result.stderr


def test_bad_model_inputs_leave_no_space_behind(hub_server, tmp_path):
    seed_model(hub_server, "README.md")
    assert deploy(hub_server, tmp_path, HF_TOKEN=TOKEN).returncode == 2
    assert writes(hub_server) == [] and not hub_server.repo_exists(SPACE, "space")
