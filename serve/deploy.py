"""`python -m serve deploy`: the chat Space for MODEL, created or brought up to date in one command.

Everything is checked before anything is written: the Space name, that MODEL
holds the GGUF the Space will serve, and that a private MODEL comes with a
token for the Space to read it. Then the Space is created (Docker SDK) or
updated: its MODEL variable, its HF_TOKEN secret when MODEL is private, its
hardware, and the bundle (serve/bundle.py) in one commit holding only the
files whose hashes differ from the Space's. A second run with nothing changed
writes nothing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path
from typing import Callable

import click

from loraship.hub import hub_errors
from serve.bundle import ROOT, bundle_files
from serve.model import DEFAULT_PATTERN, ServeError
from serve.settings import DeploySettings

SDK = "docker"
# Files the Hub keeps in every repo it creates; never deleted as stale.
HUB_OWNED = (".gitattributes",)
COMMIT_MESSAGE = "Deploy the loraship chat server (python -m serve deploy)"
Say = Callable[[str], None]


def _say(message: str) -> None:
    click.echo(message, err=True)


def git_blob_sha1(path: Path) -> str:
    """The id git, and so the Hub, gives a file's content."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_same_file(local: Path, remote) -> bool:
    """Whether the Space's file (a RepoFile, or None) holds exactly ``local``'s bytes."""
    if remote is None:
        return False
    if remote.lfs is not None:  # an LFS file's tree entry carries the content's sha256
        return remote.lfs.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    return remote.blob_id == git_blob_sha1(local)


def served_ggufs(repo_files: list[str], model_file: str | None) -> list[str]:
    """The GGUFs of a repo that serve would fetch for MODEL_FILE (or, unset, the *Q4_K_M.gguf one)."""
    pattern = model_file or DEFAULT_PATTERN
    return [f for f in repo_files if f.endswith(".gguf") and fnmatch.fnmatch(f, pattern)]


def check_model(api, settings: DeploySettings) -> bool:
    """Check that the Space could serve MODEL; return whether the repo is private."""
    model = settings.model
    with hub_errors(model, "MODEL"):
        info = api.model_info(model)
    files = sorted(s.rfilename for s in info.siblings or [])
    ggufs = [f for f in files if f.endswith(".gguf")]
    if not ggufs:
        raise ServeError(
            f"MODEL={model!r}: the repo holds no .gguf file; push an export there "
            f"(HUB_REPO={model} python -m export) or point MODEL at a repo that has one"
        )
    chosen = served_ggufs(files, settings.model_file)
    if len(chosen) != 1:
        wanted = f"MODEL_FILE={settings.model_file!r}" if settings.model_file else f"one {DEFAULT_PATTERN}"
        raise ServeError(
            f"MODEL={model!r}: the Space needs {wanted} among the repo's .gguf files ({', '.join(ggufs)}); "
            "set MODEL_FILE to the one to serve"
        )
    if info.private and settings.hf_token is None:
        raise ServeError(
            f"MODEL={model!r} is private: the Space needs a token to download it; set HF_TOKEN "
            "(stored as the Space's HF_TOKEN secret, never printed)"
        )
    return bool(info.private)


def ensure_space(api, settings: DeploySettings, say: Say) -> bool:
    """Create the Space if it is missing; return whether it was created."""
    from huggingface_hub.errors import RepositoryNotFoundError

    space = settings.space
    with hub_errors(space, "SPACE"):
        try:
            info = api.space_info(space)
        except RepositoryNotFoundError:
            info = None
        if info is None:
            api.create_repo(
                space, repo_type="space", space_sdk=SDK, private=settings.space_private,
                space_hardware=settings.space_hardware,
            )
            visibility = "private" if settings.space_private else "public"
            say(f"created the {visibility} Space {space} (Docker, {settings.space_hardware})")
            return True
    if bool(info.private) != settings.space_private:
        say(f"note: the Space is {'private' if info.private else 'public'} and keeps that; "
            "change it in the Space's settings if SPACE_PRIVATE should apply")
    return False


def update_variables(api, settings: DeploySettings, say: Say) -> None:
    """MODEL (and MODEL_FILE) as Space variables; an unset MODEL_FILE left over from before is removed."""
    space = settings.space
    wanted = {"MODEL": settings.model, "MODEL_FILE": settings.model_file}
    with hub_errors(space, "SPACE"):
        current = {key: var.value for key, var in api.get_space_variables(space).items()}
        for key, value in wanted.items():
            if value is None and key in current:
                api.delete_space_variable(space, key)
                say(f"removed the Space variable {key}")
            elif value is not None and current.get(key) != value:
                api.add_space_variable(space, key, value, description="Set by python -m serve deploy")
                say(f"set the Space variable {key}={value}")


def store_token(api, settings: DeploySettings, say: Say) -> None:
    """HF_TOKEN as a Space secret, for the Space to download the private MODEL; an existing one is kept."""
    space = settings.space
    with hub_errors(space, "SPACE"):
        secrets = api.get_space_secrets(space)
        if "HF_TOKEN" in secrets:
            # A secret cannot be read back, so it cannot be compared: replacing it each run would restart the Space.
            say("kept the Space's HF_TOKEN secret (MODEL is private); to replace it, delete it in the Space's "
                "settings and deploy again")
            return
        api.add_space_secret(
            space, "HF_TOKEN", settings.token(), description="Reads the private MODEL repo (python -m serve deploy)"
        )
    say("stored HF_TOKEN as a Space secret: MODEL is private")


def update_hardware(api, settings: DeploySettings, say: Say) -> None:
    space = settings.space
    with hub_errors(space, "SPACE"):
        runtime = api.get_space_runtime(space)
        current = runtime.requested_hardware or runtime.hardware
        if current != settings.space_hardware:
            api.request_space_hardware(space, settings.space_hardware)
            say(f"requested {settings.space_hardware} hardware (was {current})")


def upload_bundle(api, space: str, files: dict[str, Path], say: Say) -> None:
    """One commit with the bundle's files the Space lacks or holds otherwise, and without the stale ones."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.hf_api import RepoFile

    with hub_errors(space, "SPACE"):
        remote = {
            entry.path: entry
            for entry in api.list_repo_tree(space, repo_type="space", recursive=True)
            if isinstance(entry, RepoFile)
        }
        changed = [name for name, path in files.items() if not is_same_file(path, remote.get(name))]
        stale = sorted(name for name in remote if name not in files and name not in HUB_OWNED)
        if not changed and not stale:
            say(f"nothing to upload: the Space already holds these {len(files)} files")
            return
        operations = [CommitOperationAdd(name, str(files[name])) for name in changed]
        operations += [CommitOperationDelete(name) for name in stale]
        api.create_commit(space, operations, repo_type="space", commit_message=COMMIT_MESSAGE)
    removed = f", removed {len(stale)} ({', '.join(stale)})" if stale else ""
    say(f"uploaded {len(changed)} of the bundle's {len(files)} files in one commit{removed}")


def space_url(space: str) -> str:
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    return f"{endpoint.rstrip('/')}/spaces/{space}"


def deploy_space(settings: DeploySettings, root: Path = ROOT, say: Say = _say) -> str:
    """Create or update the Space; return its URL."""
    from huggingface_hub import HfApi

    files = bundle_files(root)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=settings.token())
    private_model = check_model(api, settings)
    created = ensure_space(api, settings, say)
    update_variables(api, settings, say)
    if private_model:
        store_token(api, settings, say)
    if not created:
        update_hardware(api, settings, say)
    upload_bundle(api, settings.space, files, say)
    return space_url(settings.space)
