"""loraship.hub against the stand-in Hub: real huggingface_hub calls, loopback only."""

import os
from pathlib import Path

import pytest

from loraship.hub import HubError, download_file, download_repo, list_repo_files, push_folder

TOKEN = "hf_stub_token_for_tests"


@pytest.fixture
def artifact_folder(tmp_path):
    """An adapter-like folder: a small binary, a model card, a nested manifest, a temporary."""
    folder = tmp_path / "adapter"
    (folder / "nested").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A tiny adapter\n")
    (folder / "nested" / "manifest.json").write_text('{"stage": "train"}\n')
    (folder / ".tmp-half-written").write_text("must not be uploaded")
    return folder


def _expected(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".tmp-")
    }


def test_push_folder_uploads_every_file_except_temporaries(hub_server, artifact_folder):
    url = push_folder(artifact_folder, "me/adapter", token=TOKEN)

    assert hub_server.repo_files("me/adapter") == _expected(artifact_folder)
    assert url.startswith(hub_server.url + "/me/adapter/commit/")
    assert all(r.status == 200 for r in hub_server.requests)


def test_pushed_repo_lists_and_downloads_back_byte_identical(hub_server, artifact_folder):
    # Over 10 MB: the real Hub would want LFS/Xet here; the round trip must stay byte-exact.
    (artifact_folder / "adapter_model.safetensors").write_bytes(os.urandom(10 * 1024 * 1024 + 123))
    push_folder(artifact_folder, "me/adapter", token=TOKEN)
    expected = _expected(artifact_folder)

    assert sorted(list_repo_files("me/adapter", token=TOKEN)) == sorted(expected)

    one = download_file("me/adapter", "adapter_model.safetensors", token=TOKEN)
    assert one.read_bytes() == expected["adapter_model.safetensors"]

    snapshot = download_repo("me/adapter", token=TOKEN)
    assert _expected(snapshot) == expected


def test_download_repo_honours_allow_patterns(hub_server, artifact_folder):
    push_folder(artifact_folder, "me/adapter", token=TOKEN)

    snapshot = download_repo("me/adapter", token=TOKEN, allow_patterns=["*.json"])

    assert sorted(_expected(snapshot)) == ["nested/manifest.json"]


def test_repo_is_created_private_by_default_and_token_sent_as_bearer(hub_server, artifact_folder):
    push_folder(artifact_folder, "me/adapter", token=TOKEN)

    assert hub_server.is_private("me/adapter")
    create = [r for r in hub_server.requests if r.path == "/api/repos/create"]
    assert create and create[0].json["visibility"] == "private"
    writes = [r for r in hub_server.requests if r.method == "POST"]
    assert writes and all(r.authorization == f"Bearer {TOKEN}" for r in writes)


def test_push_can_create_a_public_repo(hub_server, artifact_folder):
    push_folder(artifact_folder, "me/public", token=TOKEN, private=False)

    assert not hub_server.is_private("me/public")


def test_pushing_again_to_an_existing_repo_adds_a_commit(hub_server, artifact_folder):
    push_folder(artifact_folder, "me/adapter", token=TOKEN, commit_message="first")
    (artifact_folder / "README.md").write_text("# changed\n")

    push_folder(artifact_folder, "me/adapter", token=TOKEN, commit_message="second")

    assert hub_server.commits("me/adapter")[-2:] == ["first", "second"]
    assert hub_server.repo_files("me/adapter")["README.md"] == b"# changed\n"


def test_seeded_public_file_downloads_without_a_token(hub_server):
    hub_server.add_file("org/model-GGUF", "model-Q4_K_M.gguf", b"GGUF" + bytes(100))

    path = download_file("org/model-GGUF", "model-Q4_K_M.gguf")

    assert path.read_bytes() == b"GGUF" + bytes(100)
    assert list_repo_files("org/model-GGUF") == ["model-Q4_K_M.gguf"]


@pytest.mark.parametrize(
    ("call", "setting"),
    [
        (lambda: push_folder(Path(__file__).parent, "me/adapter", token=TOKEN), "HUB_REPO"),
        (lambda: list_repo_files("org/model", token=TOKEN), "MODEL"),
        (lambda: download_file("org/model", "model.gguf", token=TOKEN), "MODEL"),
        (lambda: download_repo("org/base", token=TOKEN), "BASE_MODEL"),
    ],
    ids=["push_folder", "list_repo_files", "download_file", "download_repo"],
)
def test_unreachable_hub_is_one_line_naming_the_setting(dead_hub_endpoint, call, setting):
    with pytest.raises(HubError) as caught:
        call()

    message = str(caught.value)
    assert message.startswith(f"{setting}=")
    assert "\n" not in message
    assert dead_hub_endpoint in message


@pytest.mark.parametrize(
    ("call", "setting"),
    [
        (lambda: list_repo_files("nobody/missing", token=TOKEN), "MODEL"),
        (lambda: download_file("nobody/missing", "model.gguf", token=TOKEN), "MODEL"),
        (lambda: download_repo("nobody/missing", token=TOKEN), "BASE_MODEL"),
    ],
    ids=["list_repo_files", "download_file", "download_repo"],
)
def test_missing_repo_says_it_does_not_exist_or_token_cannot_see_it(hub_server, call, setting):
    with pytest.raises(HubError) as caught:
        call()

    message = str(caught.value)
    assert message.startswith(f"{setting}='nobody/missing")
    assert "does not exist or the token cannot see it" in message
    assert "\n" not in message


def test_private_repo_is_invisible_without_a_token(hub_server):
    hub_server.add_file("me/secret", "model.gguf", b"x", private=True)

    with pytest.raises(HubError, match="does not exist or the token cannot see it"):
        download_file("me/secret", "model.gguf")

    assert download_file("me/secret", "model.gguf", token=TOKEN).read_bytes() == b"x"


def test_missing_file_in_an_existing_repo_is_named(hub_server):
    hub_server.add_file("org/model", "other.gguf", b"x")

    with pytest.raises(HubError, match="MODEL='org/model/model.gguf': the repo has no such file"):
        download_file("org/model", "model.gguf")


def test_push_folder_can_create_a_docker_space(hub_server, artifact_folder):
    push_folder(artifact_folder, "me/chat", token=TOKEN, repo_type="space")

    create = next(r for r in hub_server.requests if r.path == "/api/repos/create")
    assert (create.json["type"], create.json["sdk"]) == ("space", "docker")
    assert hub_server.repo_files("me/chat", repo_type="space") == _expected(artifact_folder)


def test_pushing_a_missing_folder_names_it_without_calling_the_hub(hub_server, tmp_path):
    with pytest.raises(HubError, match="HUB_REPO='me/adapter': nothing to upload, .* is not a folder"):
        push_folder(tmp_path / "absent", "me/adapter", token=TOKEN)

    assert hub_server.requests == []


def test_pushing_without_a_token_asks_for_hf_token(hub_server, artifact_folder):
    with pytest.raises(HubError) as caught:
        push_folder(artifact_folder, "me/adapter", token=None)

    assert str(caught.value) == (
        "HUB_REPO='me/adapter': the Hub refused the request (HTTP 401): set HF_TOKEN to a token with write access"
    )
    assert not hub_server.repo_exists("me/adapter")
