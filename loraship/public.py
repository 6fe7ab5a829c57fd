"""What a file that may be pushed says about this machine: names, never local paths.

A path on the Hub only tells the layout of the machine that made the file (and, under /home, whose
it was). So a pushed card, config, manifest or summary names the embedded base by its Hub id, a
local base folder by its folder name and a local dataset by its file name.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any


def is_local_path(value: str) -> bool:
    """An absolute or home-relative path, or a relative one that exists here."""
    if value.startswith(("/", "~")):
        return True
    return bool(value) and "\n" not in value and Path(value).exists()


def public_name(value: str) -> str:
    """How a pushed file names a model or dataset given as ``value``: its Hub id, else its file or folder name."""
    from loraship.embedded import EMBEDDED, EMBEDDED_HUB_ID

    if value == EMBEDDED:
        return EMBEDDED_HUB_ID
    if is_local_path(value):
        return PurePath(value.rstrip("/")).name or value
    return value


def without_local_paths(value: Any) -> Any:
    """A copy of JSON-like ``value`` whose absolute path strings are reduced to their last part."""
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and value.startswith(("/", "~")) and "\n" not in value:
        return PurePath(value.rstrip("/")).name or value
    return value
