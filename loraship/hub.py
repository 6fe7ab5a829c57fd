"""Hugging Face Hub transfer: push an artifact folder, fetch a repo or one file.

All calls go through ``huggingface_hub`` and so honour ``HF_ENDPOINT`` (tests
point it at a stand-in server on loopback) and ``HF_HUB_OFFLINE``. Errors that
mean "the user must act" (unreachable Hub, missing repo, bad token) become a
:class:`HubError` whose message names the setting involved.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator

from loraship.errors import UserError


class HubError(UserError):
    """The Hub could not be reached, or the repo/file/token is wrong."""


def looks_like_repo_id(value: str) -> bool:
    """``owner/name`` with no path that exists locally."""
    if Path(value).exists():
        return False
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))


def _request_errors() -> tuple[type, ...]:
    """The connection errors of huggingface_hub's HTTP client: httpx2's (huggingface_hub 2), httpx's (1.x, the train
    image's)."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).RequestError)
        except ImportError:
            pass
    return tuple(found)


def _explain(err: Exception, what: str, setting: str) -> HubError:
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    # Order matters: GatedRepoError is a RepositoryNotFoundError, and both the remote and
    # the local "entry not found" errors are EntryNotFoundError.
    if isinstance(err, hf_errors.GatedRepoError):
        hint = "the repo is gated: accept its terms on the Hub and use a token (HF_TOKEN) that has access"
    elif isinstance(err, hf_errors.RepositoryNotFoundError):
        hint = "the repo does not exist or the token cannot see it (check HF_TOKEN)"
    elif isinstance(err, hf_errors.RevisionNotFoundError):
        hint = "the repo has no such revision"
    elif isinstance(err, hf_errors.RemoteEntryNotFoundError):
        hint = "the repo has no such file"
    elif isinstance(err, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)):
        if constants.HF_HUB_OFFLINE:
            hint = "HF_HUB_OFFLINE is set and nothing is cached; unset it or download the files first"
        else:
            hint = f"the Hub at {endpoint} is unreachable and nothing is cached"
    elif isinstance(err, hf_errors.HfHubHTTPError) and _status(err) in (401, 403):
        hint = f"the Hub refused the request (HTTP {_status(err)}): set HF_TOKEN to a token with write access"
    elif isinstance(err, hf_errors.HfHubHTTPError):
        hint = f"the Hub answered: {_first_line(err)}"
    elif isinstance(err, (*_request_errors(), OSError)):
        hint = f"the Hub at {endpoint} could not be reached ({type(err).__name__}: {_first_line(err)})"
    else:
        # Raised by huggingface_hub before talking to the Hub (bad argument, bad README metadata...).
        hint = f"{type(err).__name__}: {_first_line(err)}"
    return HubError(f"{setting}={what!r}: {hint}")


@contextlib.contextmanager
def hub_errors(what: str, setting: str) -> Iterator[None]:
    """Turn a Hub failure inside the block into a :class:`HubError` naming ``setting``; user errors pass through."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one clear line
        raise _explain(err, what, setting) from err


def _status(err) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else ""


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None,
    repo_type: str = "model",
    private: bool = True,
    path_in_repo: str | None = None,
    commit_message: str = "Upload with loraship",
    ignore_patterns: Iterable[str] = (".tmp-*", "**/.tmp-*"),
    setting: str = "HUB_REPO",
    space_sdk: str = "docker",
    delete_patterns: Iterable[str] | None = None,
) -> str:
    """Create ``repo_id`` if needed (private by default) and upload ``folder``.

    ``space_sdk`` only matters when ``repo_type="space"`` and the Space is new.
    ``delete_patterns`` (relative to ``path_in_repo``): remote files matching them that the
    upload does not bring are deleted in the same commit, so the folder mirrors ``folder``.

    Returns the commit URL. Raises :class:`HubError` naming ``setting`` on failure.
    """
    from huggingface_hub import HfApi

    if not Path(folder).is_dir():
        raise HubError(f"{setting}={repo_id!r}: nothing to upload, {str(folder)!r} is not a folder")
    # The Hub refuses a Space without an SDK; loraship's Spaces are Docker Spaces.
    space_args = {"space_sdk": space_sdk} if repo_type == "space" else {}
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token or None)
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, **space_args)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type=repo_type,
            path_in_repo=path_in_repo,
            commit_message=commit_message,
            ignore_patterns=list(ignore_patterns),
            delete_patterns=list(delete_patterns) if delete_patterns else None,
        )
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one clear line
        raise _explain(err, repo_id, setting) from err
    return str(getattr(info, "commit_url", info))


def download_repo(
    repo_id: str,
    *,
    token: str | None = None,
    allow_patterns: Iterable[str] | None = None,
    ignore_patterns: Iterable[str] | None = None,
    repo_type: str = "model",
    setting: str = "BASE_MODEL",
) -> Path:
    """Fetch (or reuse the cached copy of) a repo snapshot; return its local folder."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            repo_type=repo_type,
            token=token or None,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
            endpoint=os.environ.get("HF_ENDPOINT"),
        )
    except Exception as err:  # noqa: BLE001
        raise _explain(err, repo_id, setting) from err
    return Path(path)


def list_repo_files(
    repo_id: str, *, token: str | None = None, setting: str = "MODEL", missing_ok: bool = False
) -> list[str]:
    """File names in a model repo; with ``missing_ok``, ``[]`` for a repo that does not exist (yet)."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token or None)
    try:
        return list(api.list_repo_files(repo_id))
    except hf_errors.RepositoryNotFoundError as err:
        if missing_ok and not isinstance(err, hf_errors.GatedRepoError):
            return []
        raise _explain(err, repo_id, setting) from err
    except Exception as err:  # noqa: BLE001
        raise _explain(err, repo_id, setting) from err


def download_file(
    repo_id: str,
    filename: str,
    *,
    token: str | None = None,
    setting: str = "MODEL",
) -> Path:
    """Fetch one file of a model repo; return its local path."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(repo_id, filename, token=token or None, endpoint=os.environ.get("HF_ENDPOINT"))
        )
    except Exception as err:  # noqa: BLE001
        raise _explain(err, f"{repo_id}/{filename}", setting) from err
