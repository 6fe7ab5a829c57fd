"""Where a Hugging Face token could end up in an image, and how to look for it.

A token given to ``docker build`` as an ARG is recorded in the image history
of every RUN after it; an ENV is in the image config for anyone who pulls it;
a RUN that uses it can write it into a layer. So the Dockerfiles may mention
the token only in comments, and a built image's config and history must not
mention it at all. The token is given at run time (``-e HF_TOKEN``).
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from dockerfile_parse import DockerfileParser

# The names huggingface_hub reads a token from.
TOKEN_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACEHUB_API_TOKEN")
_TOKEN_RE = re.compile("|".join(TOKEN_NAMES), re.IGNORECASE)
# What a real token looks like, in case one was pasted in literally.
_TOKEN_VALUE_RE = re.compile(r"hf_[A-Za-z0-9]{30,}")


def mentions_token(text: str) -> bool:
    return bool(_TOKEN_RE.search(text) or _TOKEN_VALUE_RE.search(text))


def dockerfile_token_mentions(text: str) -> list[str]:
    """``"line N: INSTRUCTION ..."`` for every instruction (not comment) naming a token."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode("utf-8")))
    found = []
    for item in parser.structure:
        if item["instruction"] == "COMMENT":
            continue
        if mentions_token(item["content"]):
            found.append(f"line {item['startline'] + 1}: {item['content'].strip()}")
    return found


def image_token_mentions(inspect: dict[str, Any], history: list[dict[str, Any]]) -> list[str]:
    """Places in an image's config (``podman image inspect``) and history naming a token."""
    found = []
    config = inspect.get("Config") or {}
    for var in config.get("Env") or []:
        if mentions_token(var.split("=", 1)[0]) or _TOKEN_VALUE_RE.search(var):
            found.append(f"config Env: {var.split('=', 1)[0]}")
    for key, value in (config.get("Labels") or {}).items():
        if mentions_token(f"{key}={value}"):
            found.append(f"config label: {key}")
    for key in ("Entrypoint", "Cmd", "Healthcheck", "OnBuild"):
        if config.get(key) and mentions_token(json.dumps(config[key])):
            found.append(f"config {key}")
    for entry in history:
        for key in ("created_by", "CreatedBy", "comment", "Comment"):
            value = entry.get(key) or ""
            if mentions_token(value):
                found.append(f"history: {value.strip()[:160]}")
    return found
