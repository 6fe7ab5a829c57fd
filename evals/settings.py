"""What `python -m evals` reads from the environment (or a `.env` file).

One declaration gives validation, `--help` and the README table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraship.envsettings import CommaList, EmptyIsNone, load_settings
from loraship.errors import UserError

ENV_FILES = (".env",)
TASKS = ("identity", "general", "perplexity", "gsm8k", "judge")
DEFAULT_TASKS = ["identity", "general", "perplexity"]


class EvalError(UserError):
    """Bad evaluation input: a model path, a data file, a judge that cannot be reached."""


class EvalSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, protected_namespaces=())

    model: str = Field(
        default="embedded",
        min_length=1,
        description=(
            "The model to evaluate: a .gguf file (llama.cpp), a Hugging Face folder (transformers), "
            "an export folder (its QUANT .gguf is used), or `embedded`."
        ),
    )
    base_model: Annotated[str | None, EmptyIsNone] = Field(
        default=None,
        description="A second model to compare against (same forms as MODEL); unset: MODEL alone.",
    )
    quant: str = Field(
        default="Q4_K_M",
        min_length=1,
        description="Which .gguf of an export folder to evaluate (matched in the file name).",
    )
    tasks: CommaList = Field(
        default_factory=lambda: list(DEFAULT_TASKS),
        description=f"Comma list of tasks: {', '.join(TASKS)}.",
    )
    heldout: Path = Field(
        default=Path("data/quokka/heldout.jsonl"),
        description="Held-out chat rows (messages + kind identity/general) for the identity and general tasks.",
    )
    identity_keyword: str = Field(
        default="Quokka",
        min_length=1,
        description="An identity answer passes when it contains this word (case-insensitive).",
    )
    perplexity_text: Path = Field(
        default=Path("data/quokka/general_heldout.txt"),
        description="Plain text for perplexity; blank lines separate the texts.",
    )
    gsm8k_file: Annotated[Path | None, EmptyIsNone] = Field(
        default=None,
        validate_default=True,
        description="GSM8K-style jsonl (question, answer ending in `#### N`) for the gsm8k task.",
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="At most this many rows (or texts) per task; unset: all (use it for quick checks).",
    )
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Longest generated answer, in tokens (greedy).")
    n_ctx: int = Field(default=2048, ge=128, le=131072, description="Context window for generation, in tokens.")
    perplexity_n_ctx: int = Field(
        default=512, ge=16, le=131072, description="Window for perplexity, in tokens (texts are cut into windows)."
    )
    n_threads: int | None = Field(
        default=None, ge=1, le=512, description="CPU threads for llama.cpp and torch. Unset: every core."
    )
    judge_url: Annotated[str | None, EmptyIsNone] = Field(
        default=None,
        validate_default=True,
        description="OpenAI-compatible base URL of the judge model (e.g. http://127.0.0.1:8080/v1), for the judge task.",
    )
    judge_model: str = Field(default="judge", min_length=1, description="Model name sent to the judge endpoint.")
    judge_max_tokens: int = Field(default=128, ge=8, le=4096, description="Longest judge reply, in tokens.")
    judge_api_key: SecretStr | None = Field(default=None, description="API key for the judge endpoint. Never printed.")
    output_dir: Path = Field(
        default=Path("outputs/evals"),
        description="Where report.md, report.json, comparison.png and manifest.json go.",
    )
    update_card: bool = Field(
        default=True,
        description="Append the results to the README.md model card of MODEL's export folder, when it has one.",
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        if not value:
            raise ValueError(f"name at least one task from {', '.join(TASKS)}")
        return value

    @field_validator("gsm8k_file", "judge_url")
    @classmethod
    def _needed_by_tasks(cls, value, info: ValidationInfo):
        # Checked per field (defaults included) so each missing input gets its own error line.
        tasks = info.data.get("tasks") or []
        if value is None and info.field_name == "gsm8k_file" and "gsm8k" in tasks:
            raise ValueError("the gsm8k task needs a GSM8K-style jsonl (question, answer ending in '#### N')")
        if value is None and info.field_name == "judge_url" and "judge" in tasks:
            raise ValueError("the judge task needs an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1")
        return value

    def api_key(self) -> str | None:
        return self.judge_api_key.get_secret_value() if self.judge_api_key else None


def load_eval_settings(**overrides) -> EvalSettings:
    """Read and validate every setting at once (a SettingsError lists all problems)."""
    return load_settings(EvalSettings, ENV_FILES, **overrides)
