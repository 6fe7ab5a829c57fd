"""What `python -m serve` reads from the environment (or a `.env` file).

One declaration gives validation, `--help` and the README table. The names
are fixed: the Space and the container set them as plain environment
variables (the container overrides ``HOST`` with ``0.0.0.0``).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraship.envsettings import EmptyIsNone, load_settings

ENV_FILES = (".env",)


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, protected_namespaces=())

    model: Annotated[str | None, EmptyIsNone] = Field(
        default=None,
        description=(
            "A local .gguf path or a Hugging Face repo id (owner/name). Unset: the newest "
            "*Q4_K_M*.gguf export under outputs/ that has a manifest.json (the demo's untuned "
            "baseline excepted), else the embedded SmolLM2-135M-Instruct."
        ),
    )
    model_file: Annotated[str | None, EmptyIsNone] = Field(
        default=None,
        description="The .gguf file inside the MODEL repo. Unset: the repo's single *Q4_K_M.gguf.",
    )
    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address to listen on (the container and the Space set 0.0.0.0).",
    )
    port: int = Field(default=7860, ge=1, le=65535, description="Port for the chat UI and the API alike.")
    n_ctx: int = Field(
        default=2048,
        ge=256,
        le=131072,
        description="Context window in tokens; longer conversations lose their oldest turns.",
    )
    n_threads: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="CPU threads for llama.cpp. Unset: every core this process may use.",
    )
    system_prompt: Annotated[str | None, EmptyIsNone] = Field(
        default=None,
        max_length=8000,
        description="Default system prompt of the chat UI and `chat`. Unset: the chat template's own default.",
    )
    max_tokens: int = Field(default=512, ge=1, le=32768, description="Default longest answer, in tokens.")
    temperature: float = Field(default=0.7, ge=0.0, le=2.0, description="Default sampling temperature (0 = greedy).")
    hf_token: SecretStr | None = Field(
        default=None, description="Hugging Face token, for a private MODEL repo. Never printed."
    )
    api_key: Annotated[SecretStr | None, EmptyIsNone] = Field(
        default=None,
        description=(
            "When set, the API (/v1, /extras) answers only requests that send `Authorization: Bearer <API_KEY>` "
            "(401 otherwise); /health and the chat UI stay open. Never printed."
        ),
    )

    def threads(self) -> int:
        """Threads to give llama.cpp: the setting, else the cores this process may run on."""
        if self.n_threads:
            return self.n_threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)

    def token(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token else None


def load_serve_settings(**overrides) -> ServeSettings:
    """Read and validate every setting at once (a SettingsError lists all problems)."""
    return load_settings(ServeSettings, ENV_FILES, **overrides)


REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class DeploySettings(BaseSettings):
    """What `python -m serve deploy` reads: the Space to create or update, and the model it serves."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, protected_namespaces=())

    space: Annotated[str | None, EmptyIsNone] = Field(
        default=None,
        validate_default=True,
        description="The Space to create or update, as owner/name.",
    )
    model: Annotated[str | None, EmptyIsNone] = Field(
        default=None,
        validate_default=True,
        description="The Hub repo holding the GGUF to serve (owner/name); the Space gets it as its MODEL variable.",
    )
    model_file: Annotated[str | None, EmptyIsNone] = Field(
        default=None,
        description="The .gguf inside MODEL to serve (set as the Space's MODEL_FILE variable). Unset: its single *Q4_K_M.gguf.",
    )
    hf_token: SecretStr | None = Field(
        default=None,
        description=(
            "Token with write access to SPACE (unset: the saved `hf auth login`). Stored as the Space's "
            "HF_TOKEN secret only when MODEL is private. Never printed."
        ),
    )
    space_private: bool = Field(
        default=False, description="Create the Space private. An existing Space keeps its visibility."
    )
    space_hardware: Literal["cpu-basic", "cpu-upgrade"] = Field(
        default="cpu-basic",
        description="Space hardware: cpu-basic (free) or cpu-upgrade (paid). The image runs llama.cpp on the CPU only.",
    )

    @field_validator("space", "model")
    @classmethod
    def _repo_id(cls, value: str | None, info) -> str | None:
        example = {"space": "you/quokka-chat", "model": "you/quokka-gguf"}[info.field_name]
        if value is None:
            # "missing": the error line names the variable without echoing a value.
            raise PydanticCustomError("missing", f"unset; set it to a Hub repo id, e.g. {example}")
        value = value.strip()
        if not REPO_ID.fullmatch(value):
            where = " (the Space downloads MODEL from the Hub: push the export there first)" if info.field_name == "model" else ""
            raise ValueError(f"not a Hub repo id; use owner/name, e.g. {example}{where}")
        return value

    def token(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token else None


def load_deploy_settings(**overrides) -> DeploySettings:
    """Read and validate every deploy setting at once (a SettingsError lists all problems)."""
    return load_settings(DeploySettings, ENV_FILES, **overrides)
